"""VeRA (``peft_type: VERA``): ``W' = W + (λ_b ⊙ B[:out]) @ (λ_d ⊙ A[:, :in])``, A and B shared by all layers.

PEFT 0.21: ``tuners/vera/model.py`` (``VeraModel._find_dim``, ``_init_vera_A_vera_B``, ``_kaiming_init``,
``_get_adapter_state_dict``, ``_remap_adapter_state_dict_for_load``), ``tuners/vera/layer.py``
(``VeraLayer.update_layer``, ``Linear.get_delta_weight``, ``Linear.merge``) and ``tuners/vera/config.py``
(``VeraConfig``: ``r = 256``, ``projection_prng_key = 0``, ``save_projection = True``).

Per module PEFT saves ``vera_lambda_b`` (out) and ``vera_lambda_d`` (r); the random projections are kept once for
the model: ``base_model.vera_A`` (r, max_in) and ``base_model.vera_B`` (max_out, r), max over every targeted layer
(``_find_dim``). They reach each module as shared tensors (:attr:`Method.shared`). With ``save_projection = false``
they are not saved: PEFT draws them again, ``Generator("cpu").manual_seed(projection_prng_key)``, then
``empty(r, max_in).uniform_(±√3·√2/√max_in)`` and ``empty(max_out, r).uniform_(±√3·√2/√r)`` with that generator,
in that order (``_kaiming_init``); so does this module, with the largest layer sizes the plan finds in the base
(:meth:`Method.with_layers`). Drawn ones are first rounded to the base layer's dtype and back: PEFT moves the shared
buffers to the layers' dtype (``_move_adapter_to_device_of_base_layer``) before upcasting the adapter to fp32; saved
ones are loaded over them after that. Saved projections must have exactly PEFT's sizes (it cannot load them
otherwise).

``get_delta_weight``: slices ``A[:, :in]`` and ``B[:out, :]``, ``(λ_b[:, None] * B) @ (λ_d[:, None] * A)``, all fp32
(PEFT holds adapter tensors and buffers in fp32 after loading, whatever the base's dtype), transposed for a Conv1D;
the merge adds it in place to W (one rounding to W's dtype). PVeRA (:mod:`loraship.methods.pvera`) is the same with
a doubled λ_d and A, of which the merge uses the first halves (the means).
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


def _is_whole(v: Any, least: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= least


def is_seed(v: Any) -> bool:
    """What ``torch.Generator().manual_seed`` accepts (a negative seed is taken modulo 2^64)."""
    return isinstance(v, int) and not isinstance(v, bool) and -(2**63) <= v < 2**64


class VeRA(Method):
    peft_type = "VERA"
    name = "VeRA"
    prefix: ClassVar[str] = "vera"
    config_class: ClassVar[str] = "VeraConfig"
    #: λ_d and A hold this many vectors per rank (PVeRA: a mean and a log-variance).
    halves: ClassVar[int] = 1
    roles = ("vera_lambda_b", "vera_lambda_d")
    shared = ("vera_A", "vera_B")
    fields: ClassVar[dict[str, tuple[str, Callable[[Any], bool]]]] = {
        "r": ("a whole number from 1", lambda v: _is_whole(v, 1)),
        "projection_prng_key": ("a whole number (a torch seed)", is_seed),
        "save_projection": ("true or false", lambda v: isinstance(v, bool)),
        "fan_in_fan_out": ("true or false", lambda v: isinstance(v, bool)),
        "init_weights": ("true or false", lambda v: isinstance(v, bool)),
    }

    @property
    def _a(self) -> str:
        return f"base_model.{self.prefix}_A"

    @property
    def _b(self) -> str:
        return f"base_model.{self.prefix}_B"

    def module(self, name: str, tensors: Mapping[str, Saved], config: Mapping[str, Any], folder: Path) -> MethodModule:
        own = {f"{self.prefix}_lambda_b", f"{self.prefix}_lambda_d"}
        if not own <= set(tensors):
            raise incomplete(folder, name, set(tensors), self.name)
        for key in ("r", "projection_prng_key", "save_projection"):
            if key in config and config[key] is None:
                raise AdapterError(
                    f"`{folder}` sets `{key}` to null, but PEFT's {self.config_class} needs a value there to merge.",
                    fix=f"Restore `{key}` as PEFT saved it with these weights, or save the adapter again with PEFT.",
                )
        save = bool(config.get("save_projection", True))
        saved = {self._a, self._b} & set(tensors)
        if save and len(saved) < 2:
            raise AdapterError(
                f"`{folder}` sets `save_projection` to true, but the adapter file lacks "
                + " and ".join(f"`{k}`" for k in sorted({self._a, self._b} - saved))
                + f": PEFT refuses to load such a {self.name} adapter.",
                fix="Restore the adapter file PEFT saved, or set `save_projection` to false if it was trained with "
                "projections drawn from `projection_prng_key`.",
            )
        if not save and saved:
            raise AdapterError(
                f"`{folder}` sets `save_projection` to false, but the adapter file holds "
                + " and ".join(f"`{k}`" for k in sorted(saved))
                + f": PEFT would ignore them and draw the {self.name} projections again from `projection_prng_key`, "
                "so which ones the adapter was trained with is unclear.",
                fix="Set `save_projection` to true if the saved projections are the ones the adapter was trained "
                "with; otherwise remove them from the adapter file.",
            )
        for role in own:
            if len(tensors[role].shape) != 1:
                raise AdapterError(
                    f"`{folder}`: the {self.name} module `{name}` has {role} {list(tensors[role].shape)}, but PEFT "
                    "saves it as one vector.",
                    fix="The adapter file is not one PEFT saved: save the adapter again with PEFT.",
                )
        settings = (
            ("r", int(config.get("r", 256))),
            ("seed", int(config.get("projection_prng_key", 0))),
            ("save_projection", save),
        )
        return MethodModule(self.peft_type, name, tuple(sorted(tensors.items())), settings)

    def with_layers(
        self, m: MethodModule, layers: tuple[tuple[str, int, int], ...], *, ordered: bool = True
    ) -> MethodModule:
        if not layers:
            return m
        largest = (("max_out", max(o for _, o, _ in layers)), ("max_in", max(i for _, _, i in layers)))
        kept = tuple((k, v) for k, v in m.settings if k not in ("max_out", "max_in"))
        return MethodModule(m.method, m.module, m.tensors, kept + largest)

    def _projection_shapes(self, m: MethodModule) -> tuple[tuple[int, int], tuple[int, int]]:
        r = m.setting("r")
        return (self.halves * r, m.setting("max_in")), (m.setting("max_out"), r)

    def shape_problem(self, m: MethodModule, param: str, shape: tuple[int, ...], fan_in_fan_out: bool) -> str | None:
        if len(shape) != 2:
            return Unsupported(
                f"{self.name} on a {len(shape)}-D weight is not merged (PEFT's {self.name} adapts only Linear and "
                "Conv1D layers)"
            )
        out_features = shape[1] if fan_in_fan_out else shape[0]
        (b_len,), (d_len,) = m.shape(f"{self.prefix}_lambda_b"), m.shape(f"{self.prefix}_lambda_d")
        if b_len != out_features:
            return (
                f"the adapter's {self.prefix}_lambda_b has {b_len} values, one per output of the layer it was trained "
                f"on, not {out_features}"
            )
        r = m.setting("r")
        if d_len != self.halves * r:
            return (
                f"the adapter's {self.prefix}_lambda_d has {d_len} values, while its r = {r} makes PEFT build "
                f"{self.halves * r}"
            )
        shape_a, shape_b = self._projection_shapes(m)
        for key, expected in ((self._a, shape_a), (self._b, shape_b)):
            info = m.tensor(key)
            if info is not None and tuple(info.shape) != expected:
                return (
                    f"the adapter's {key} is {list(info.shape)}, while PEFT builds it {list(expected)} for the largest "
                    f"layers this base has where the adapter applies (r = {r}, {shape_b[0]} outputs, {shape_a[1]} "
                    "inputs)"
                )
        return None

    def projections(
        self, m: MethodModule, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The shared A and B as PEFT holds them when it merges into a layer of ``dtype``: the saved ones in fp32,
        or drawn again from the seed, rounded to ``dtype`` and back (PEFT moves the shared buffers to the first
        layer's dtype, ``_move_adapter_to_device_of_base_layer``, then upcasts them with the adapter's tensors;
        saved ones are loaded over them after that)."""
        if m.setting("save_projection"):
            return adapter_float(tensors[self._a]), adapter_float(tensors[self._b])
        import torch

        shape_a, shape_b = self._projection_shapes(m)
        key = (shape_a, shape_b, m.setting("seed"), dtype)
        if key not in _LAST:  # every layer shares them: drawn once
            generator = torch.Generator(device="cpu").manual_seed(m.setting("seed"))
            drawn = kaiming_uniform(shape_a, generator), kaiming_uniform(shape_b, generator)
            _LAST.clear()
            _LAST[key] = drawn[0].to(dtype).float(), drawn[1].to(dtype).float()
        return _LAST[key]

    def merge(
        self, m: MethodModule, param: str, weight: torch.Tensor, tensors: Mapping[str, torch.Tensor],
        fan_in_fan_out: bool,
    ) -> torch.Tensor:  # fmt: skip
        out_features, in_features = (weight.shape[1], weight.shape[0]) if fan_in_fan_out else weight.shape
        vera_a, vera_b = self.projections(m, tensors, weight.dtype)
        lambda_d = adapter_float(tensors[f"{self.prefix}_lambda_d"])
        lambda_b = adapter_float(tensors[f"{self.prefix}_lambda_b"])
        sliced_a = vera_a[:, :in_features]
        sliced_b = vera_b[:out_features, :]
        lambda_b = lambda_b.unsqueeze(-1)
        lambda_d = lambda_d.unsqueeze(-1)
        if self.halves == 2:  # the means: the first half of λ_d and of A's rows
            lambda_d = lambda_d[: lambda_d.size(0) // 2, :]
            sliced_a = sliced_a[: sliced_a.size(0) // 2, :]
        delta = (lambda_b * sliced_b) @ (lambda_d * sliced_a)
        weight += delta.T if fan_in_fan_out else delta
        return weight

    def describe(self, m: MethodModule) -> str:
        drawn = "" if m.setting("save_projection") else f", projections from seed {m.setting('seed')}"
        return f"{self.name} r={m.setting('r')}{drawn}"

    def summary(self, modules: tuple[MethodModule, ...]) -> str:
        save = {bool(m.setting("save_projection")) for m in modules}
        return (
            f"r = {span([m.setting('r') for m in modules])}, projection_prng_key = "
            f"{span([m.setting('seed') for m in modules])}, save_projection = "
            + "/".join("true" if s else "false" for s in sorted(save))
        )


#: The projections last drawn: (A's shape, B's shape, seed, layer dtype) -> (A, B). Read only.
_LAST: dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor]] = {}


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """VeRA's ``_kaiming_init`` (and ``nn.init.kaiming_uniform_`` with its defaults): fp32 ``uniform_`` on
    ``±√3·√2/√fan_in`` drawn from ``generator``, fan_in the second dimension."""
    import torch

    tensor = torch.empty(shape)
    bound = math.sqrt(3.0) * (math.sqrt(2) / math.sqrt(shape[1]))
    with torch.no_grad():
        return tensor.uniform_(-bound, bound, generator=generator)


METHOD = VeRA()
