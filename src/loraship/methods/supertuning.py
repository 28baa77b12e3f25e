"""SuperTuning (``peft_type: SUPERTUNING``): trained values scatter-added at chosen places of W (plus a LoRA in Supra
mode).

PEFT 0.21: ``tuners/supertuning/layer.py`` (``SupertuningLayer.__init__``, ``_num_trainable``, ``update_layer``,
``Linear._lora_delta``, ``Linear.merge``), ``tuners/supertuning/model.py`` (``_create_new_module``: nn.Linear only)
and ``tuners/supertuning/config.py`` (``SupertuningConfig``: ``sparsity = 0.99``, ``select_top = True``, ``r`` /
``lora_alpha`` for Supra mode, ``save_precomputed_indices = True``).

Per module PEFT saves ``supertuning_values`` (n, fp32) and, with ``save_precomputed_indices``, ``supertuning_indices``
(n flat places into W, int32). Without them the places are chosen again at load from the base weight:
``topk(|W|.flatten(), k=n, largest=select_top)``, ``n = int(out·in·(1 - sparsity))`` — the same torch call here, on
the base weight before the merge. Supra mode adds ``supertuning_lora_A.weight (r, in)`` and ``supertuning_lora_B.weight
(out, r)``.

``Linear.merge``: ``W.reshape(-1).scatter_add_(0, places, values.to(W.dtype))`` — the values are rounded to W's dtype
first, then added in it — and in Supra mode ``W.add_(((lora_alpha / r) * (B @ A)).to(W.dtype))`` (the fp32 LoRA delta
rounded to W's dtype, then added): on a half base each is its own rounding, reproduced as PEFT does them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from loraship.errors import AdapterError
from loraship.methods.base import Method, MethodModule, Saved, Unsupported, adapter_float, incomplete, span

if TYPE_CHECKING:
    import torch

_VALUES, _INDICES = "supertuning_values", "supertuning_indices"
_LORA = ("supertuning_lora_A.weight", "supertuning_lora_B.weight")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class SuperTuning(Method):
    peft_type = "SUPERTUNING"
    name = "SuperTuning"
    roles = (_VALUES, _INDICES, *_LORA)
    fields: ClassVar[dict[str, tuple[str, Callable[[Any], bool]]]] = {
        "sparsity": ("a number from 0 up to (not including) 1", lambda v: _is_number(v) and 0.0 <= v < 1.0),
        "select_top": ("true or false", lambda v: isinstance(v, bool)),
        "r": ("a whole number from 1", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1),
        "lora_alpha": ("a number", _is_number),
        "save_precomputed_indices": ("true or false", lambda v: isinstance(v, bool)),
        "init_weights": ("true or false", lambda v: isinstance(v, bool)),
    }

    def module(self, name: str, tensors: Mapping[str, Saved], config: Mapping[str, Any], folder: Path) -> MethodModule:
        saved = bool(config.get("save_precomputed_indices", True))
        supra = config.get("r") is not None
        needed = {_VALUES} | ({_INDICES} if saved else set()) | (set(_LORA) if supra else set())
        if not needed <= set(tensors):
            raise incomplete(folder, name, set(tensors), self.name)
        if not saved and _INDICES in tensors:
            raise AdapterError(
                f"`{folder}` sets `save_precomputed_indices` to false, but the SuperTuning module `{name}` holds "
                "supertuning_indices: PEFT would ignore them and choose the places again from the base weight, so "
                "which ones the adapter was trained with is unclear.",
                fix="Set `save_precomputed_indices` to true if the saved places are the ones the adapter was trained "
                "with; otherwise remove them from the adapter file.",
            )
        if not supra and set(_LORA) & set(tensors):
            raise AdapterError(
                f"`{folder}`: the SuperTuning module `{name}` holds a Supra-mode LoRA (supertuning_lora_A/B), but the "
                "config sets no `r`, so PEFT cannot load it.",
                fix="Restore `r` and `lora_alpha` as PEFT saved them with these weights.",
            )
        if supra and config.get("lora_alpha") is None:
            raise AdapterError(
                f"`{folder}` sets `r` but not `lora_alpha`: PEFT's SupertuningConfig refuses Supra mode without it.",
                fix="Restore `lora_alpha` as PEFT saved it with these weights.",
            )
        settings: tuple[tuple[str, bool | int | float | str], ...] = (
            ("sparsity", float(config.get("sparsity", 0.99))),
            ("select_top", bool(config.get("select_top", True))),
            ("saved_indices", saved),
        )
        if supra:
            r, alpha = int(config["r"]), float(config["lora_alpha"])
            settings += (("r", r), ("alpha", alpha))
        return MethodModule(self.peft_type, name, tuple(sorted(tensors.items())), settings)

    def shape_problem(self, m: MethodModule, param: str, shape: tuple[int, ...], fan_in_fan_out: bool) -> str | None:
        if len(shape) != 2 or fan_in_fan_out:
            layer = "Conv1D" if fan_in_fan_out else f"{len(shape)}-D"
            return Unsupported(
                f"SuperTuning on a {layer} weight is not merged (PEFT's SuperTuning adapts only nn.Linear layers)"
            )
        out_features, in_features = shape
        n = int(out_features * in_features * (1 - m.setting("sparsity")))
        (found,) = m.shape(_VALUES)
        if found != n:
            return (
                f"the adapter's {_VALUES} has {found} values, while sparsity = {m.setting('sparsity'):g} makes PEFT "
                f"train {n} of a weight of {out_features} outputs and {in_features} inputs"
            )
        if m.setting("saved_indices") and m.shape(_INDICES) != (n,):
            return f"the adapter's {_INDICES} is {list(m.shape(_INDICES))}, not [{n}] as its {_VALUES}"
        if m.setting("r") is not None:
            r = m.setting("r")
            for role, expected in zip(_LORA, ((r, in_features), (out_features, r)), strict=True):
                if m.shape(role) != expected:
                    return (
                        f"the adapter's {role} is {list(m.shape(role))}, while PEFT builds it {list(expected)} for a "
                        f"layer of {out_features} outputs and {in_features} inputs with r = {r}"
                    )
        return None

    def merge(
        self, m: MethodModule, param: str, weight: torch.Tensor, tensors: Mapping[str, torch.Tensor],
        fan_in_fan_out: bool,
    ) -> torch.Tensor:  # fmt: skip
        import torch

        values = adapter_float(tensors[_VALUES])
        weight = weight if weight.is_contiguous() else weight.contiguous()  # scatter into a view of it
        if m.setting("saved_indices"):
            places = tensors[_INDICES].to(torch.int32)
        else:  # SupertuningLayer.update_layer, on the base weight as loaded
            _, places = torch.topk(weight.abs().flatten(), k=values.shape[0], largest=m.setting("select_top"))
            places = places.to(dtype=torch.int32)
        weight.reshape(-1).scatter_add_(0, places.to(torch.int64), values.to(weight.dtype))
        if m.setting("r") is not None:
            a, b = (adapter_float(tensors[role]) for role in _LORA)
            weight.add_(((m.setting("alpha") / m.setting("r")) * (b @ a)).to(weight.dtype))
        return weight

    def describe(self, m: MethodModule) -> str:
        supra = f" + LoRA r={m.setting('r')}" if m.setting("r") is not None else ""
        places = "" if m.setting("saved_indices") else ", places from the base weight"
        return f"SuperTuning sparsity={m.setting('sparsity'):g}{supra}{places}"

    def summary(self, modules: tuple[MethodModule, ...]) -> str:
        return f"sparsity = {span([m.setting('sparsity') for m in modules])}"


METHOD = SuperTuning()
