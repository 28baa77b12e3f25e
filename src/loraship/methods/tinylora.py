"""TinyLoRA (``peft_type: TINYLORA``): ``W' = W + B @ (Σ_i v_i P_i) @ A``, tiny trained vectors v shared by groups of
layers.

PEFT 0.21: ``tuners/tinylora/model.py`` (``TinyLoraModel._build_target_key_mapping``, ``_create_and_replace``: each
targeted layer's index in the model's order of modules and its group of ``weight_tying``; ``_get_adapter_state_dict``,
``_remap_adapter_state_dict_for_load``, ``_cast_adapter_dtype``), ``tuners/tinylora/layer.py``
(``TinyLoraLayer.update_layer``, ``_init_svd``, ``_get_layer_seed``, ``_init_projection``, ``_compute_R``,
``get_delta_weight``, ``Linear.merge``, ``Embedding.merge``) and ``tuners/tinylora/config.py`` (``TinyLoraConfig``:
``r = 2``, ``u = 64``, ``weight_tying = 0``, ``projection_seed = 42``, ``save_projection = True``).

Per module PEFT saves ``tinylora_A (r, in)`` and ``tinylora_B (out, r)`` (the base weight's truncated SVD, kept as
buffers) and, with ``save_projection``, ``tinylora_P (u, r, r)``; the trained vectors are kept once for the model,
``base_model.tinylora_v.<g>`` (u) for each group ``g``, and reach every module as shared tensors. A layer's index
``i`` counts the targeted layers in the model's order (:meth:`Method.with_layers`); its group is ``min(i // size,
groups - 1)`` with ``groups = max(1, round(N · (1 - weight_tying)))``, ``size = max(1, N // groups)``. Without saved
projections ``P = normal(0, 1/√r, (u, r, r))`` from ``Generator().manual_seed(projection_seed + i)``.

dtypes: after loading PEFT holds A, B, a saved P and v in fp32 (the saved values exactly); a drawn P is moved to the
layer's dtype first and back (``_move_adapter_to_device_of_base_layer``, then the adapter's upcast). ``R =
einsum("i,ijk->jk", v, P)``, ``Δ = B @ R @ A`` in fp32, transposed for a Conv1D, added in place to W (one rounding).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from loraship.errors import AdapterError
from loraship.methods.base import Method, MethodModule, Saved, Unsupported, adapter_float, incomplete, span
from loraship.methods.vera import is_seed

if TYPE_CHECKING:
    import torch

_A, _B, _P = "tinylora_A", "tinylora_B", "tinylora_P"
_V = "base_model.tinylora_v"


def _is_whole(v: Any, least: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= least


class TinyLoRA(Method):
    peft_type = "TINYLORA"
    name = "TinyLoRA"
    roles = (_A, _B, _P)
    shared = ("tinylora_v",)
    fields: ClassVar[dict[str, tuple[str, Callable[[Any], bool]]]] = {
        "r": ("a whole number from 1", lambda v: _is_whole(v, 1)),
        "u": ("a whole number from 1", lambda v: _is_whole(v, 1)),
        "weight_tying": (
            "a number from 0 to 1",
            lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and 0 <= v <= 1,
        ),
        "projection_seed": ("a whole number (a torch seed)", is_seed),
        "save_projection": ("true or false", lambda v: isinstance(v, bool)),
        "fan_in_fan_out": ("true or false", lambda v: isinstance(v, bool)),
    }

    def module(self, name: str, tensors: Mapping[str, Saved], config: Mapping[str, Any], folder: Path) -> MethodModule:
        for key in ("r", "u", "weight_tying", "projection_seed", "save_projection"):
            if key in config and config[key] is None:
                raise AdapterError(
                    f"`{folder}` sets `{key}` to null, but PEFT's TinyLoraConfig needs a value there to merge.",
                    fix=f"Restore `{key}` as PEFT saved it with these weights, or save the adapter again with PEFT.",
                )
        save = bool(config.get("save_projection", True))
        if not {_A, _B} | ({_P} if save else set()) <= set(tensors):
            raise incomplete(folder, name, set(tensors), self.name)
        if not save and _P in tensors:
            raise AdapterError(
                f"`{folder}` sets `save_projection` to false, but the TinyLoRA module `{name}` holds tinylora_P: PEFT "
                "would ignore it and draw the projection again from `projection_seed`, so which one the adapter was "
                "trained with is unclear.",
                fix="Set `save_projection` to true if the saved projections are the ones the adapter was trained "
                "with; otherwise remove them from the adapter file.",
            )
        settings = (
            ("r", int(config.get("r", 2))),
            ("u", int(config.get("u", 64))),
            ("weight_tying", float(config.get("weight_tying", 0.0))),
            ("seed", int(config.get("projection_seed", 42))),
            ("save_projection", save),
            ("groups_saved", sum(1 for k in tensors if k.startswith(_V + "."))),
        )
        return MethodModule(self.peft_type, name, tuple(sorted(tensors.items())), settings)

    def with_layers(
        self, m: MethodModule, layers: tuple[tuple[str, int, int], ...], *, ordered: bool = True
    ) -> MethodModule:
        """The layer's index among the targeted layers (the model's order) and the group of v it uses."""
        names = [name for name, _, _ in layers]
        if m.module not in names:
            return m
        index, count = names.index(m.module), len(names)
        groups = max(1, round(count * (1.0 - m.setting("weight_tying"))))
        size = max(1, count // groups)
        group = min(index // size, groups - 1)
        kept = tuple((k, v) for k, v in m.settings if k not in ("index", "group", "groups", "layers", "ordered"))
        found = (("index", index), ("group", group), ("groups", groups), ("layers", count), ("ordered", ordered))
        return MethodModule(m.method, m.module, m.tensors, kept + found)

    def shape_problem(self, m: MethodModule, param: str, shape: tuple[int, ...], fan_in_fan_out: bool) -> str | None:
        if len(shape) != 2:
            return Unsupported(
                f"TinyLoRA on a {len(shape)}-D weight is not merged (PEFT's TinyLoRA adapts only Linear, Conv1D and "
                "Embedding layers)"
            )
        if not m.setting("ordered", True) and (m.setting("groups", 1) > 1 or not m.setting("save_projection")):
            return Unsupported(
                "TinyLoRA is not merged here: which tinylora_v vector"
                + ("" if m.setting("save_projection") else " and projection seed")
                + " a layer gets follows its number in the model's order of modules, and loraship could not build "
                "the model class to read that order"
            )
        out_features, in_features = (shape[1], shape[0]) if fan_in_fan_out else shape
        r = min(m.setting("r"), out_features, in_features)
        u = m.setting("u")
        expected = {_A: (r, in_features), _B: (out_features, r)} | (
            {_P: (u, r, r)} if m.setting("save_projection") else {}
        )
        for role, wanted in expected.items():
            if m.shape(role) != wanted:
                return (
                    f"the adapter's {role} is {list(m.shape(role))}, while PEFT builds it {list(wanted)} for a layer "
                    f"of {out_features} outputs and {in_features} inputs (r = {m.setting('r')}, u = {u})"
                )
        if m.setting("groups") != m.setting("groups_saved"):
            return (
                f"the adapter saves {m.setting('groups_saved')} tinylora_v vectors, while its weight_tying = "
                f"{m.setting('weight_tying'):g} over the {m.setting('layers')} layers it changes in this "
                f"base makes PEFT build {m.setting('groups')}"
            )
        info = m.tensor(f"{_V}.{m.setting('group')}")
        if info is None or tuple(info.shape) != (u,):
            shown = list(info.shape) if info is not None else "missing"
            return f"the adapter's {_V}.{m.setting('group')} is {shown}, while PEFT builds it [{u}]"
        return None

    def merge(
        self, m: MethodModule, param: str, weight: torch.Tensor, tensors: Mapping[str, torch.Tensor],
        fan_in_fan_out: bool,
    ) -> torch.Tensor:  # fmt: skip
        import torch

        # PEFT holds A, B and a saved P in fp32 after loading (what was saved, exactly); a drawn P went to the
        # layer's dtype first (_move_adapter_to_device_of_base_layer) and back.
        a, b = adapter_float(tensors[_A]), adapter_float(tensors[_B])
        if m.setting("save_projection"):
            p = adapter_float(tensors[_P])
        else:  # TinyLoraLayer._init_projection
            r = a.shape[0]
            generator = torch.Generator().manual_seed(m.setting("seed") + m.setting("index"))
            drawn = torch.normal(mean=0.0, std=1.0 / (r**0.5), size=(m.setting("u"), r, r), generator=generator)
            p = drawn.to(weight.dtype).float()
        v = adapter_float(tensors[f"{_V}.{m.setting('group')}"])
        big_r = torch.einsum("i,ijk->jk", v, p.to(dtype=v.dtype))
        delta = b @ big_r @ a
        weight += delta.T if fan_in_fan_out else delta
        return weight

    def describe(self, m: MethodModule) -> str:
        drawn = "" if m.setting("save_projection") else f", projection from seed {m.setting('seed')}+layer"
        return f"TinyLoRA r={m.setting('r')} u={m.setting('u')}{drawn}"

    def summary(self, modules: tuple[MethodModule, ...]) -> str:
        return (
            ", ".join(f"{key} = {span([m.setting(key) for m in modules])}" for key in ("r", "u", "weight_tying"))
            + f", tinylora_v vectors = {span([m.setting('groups_saved') for m in modules])}"
        )


METHOD = TinyLoRA()
