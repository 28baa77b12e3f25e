"""GraLoRA (``peft_type: GRALORA``): a LoRA per ``k x k`` sub-block of W (``r / k`` ranks each, their A and B
factors exchanged across blocks), plus an optional plain LoRA of rank ``hybrid_r``, times ``alpha / (r + hybrid_r)``.

PEFT 0.21: ``tuners/gralora/layer.py`` (``GraloraLayer.__init__``: Linear and Conv1D layers; ``update_layer``,
``Linear.get_delta_weight``, ``Linear.merge``), ``tuners/gralora/model.py`` (``_create_new_module``: ``fan_in_fan_out``
forced to the layer's layout) and ``tuners/gralora/config.py`` (``GraloraConfig``: ``r = 32``, ``hybrid_r = 0``,
``alpha = 64``, ``gralora_k = 2``; ``r`` must be a multiple of ``gralora_k``).

Per module PEFT saves ``gralora_A (k, in / k, r)``, ``gralora_B (k, r, out / k)`` and, with ``hybrid_r > 0``,
``gralora_A_general.weight (hybrid_r, in)`` and ``gralora_B_general.weight (out, hybrid_r)`` (fp32: PEFT upcasts a
half-precision adapter on load). ``get_delta_weight``: A scattered into an ``(in, k, r)`` zero tensor by input block,
its rank split in ``k`` groups and permuted, ``einsum("ikr, kro -> iko", ·, B)`` reshaped to ``(in, out)`` and
transposed; ``+= B_general @ A_general``; transposed again for a Conv1D, times the Python float
``alpha / (r + hybrid_r)``. The merge adds it in place to W (one rounding to W's dtype). These are reproduced op for
op. ``gralora_dropout`` is training only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraship.errors import AdapterError
from loraship.methods.base import Method, MethodModule, Saved, Unsupported, _is_number, adapter_float, incomplete, span

if TYPE_CHECKING:
    import torch

_BLOCKS = ("gralora_A", "gralora_B")
_HYBRID = ("gralora_A_general.weight", "gralora_B_general.weight")


def _is_whole(v: Any, least: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= least


#: adapter_config.json fields GraLoRA reads, with what PEFT's GraloraConfig expects.
_FIELDS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "r": ("a whole number from 1", lambda v: _is_whole(v, 1)),
    "hybrid_r": ("a whole number from 0", lambda v: _is_whole(v, 0)),
    "alpha": ("a number", _is_number),
    "gralora_k": ("a whole number from 1", lambda v: _is_whole(v, 1)),
    "gralora_dropout": ("a number", _is_number),
    "fan_in_fan_out": ("true or false", lambda v: isinstance(v, bool)),
    "init_weights": ("true or false", lambda v: isinstance(v, bool)),
}


class GraLoRA(Method):
    peft_type = "GRALORA"
    name = "GraLoRA"
    roles = _BLOCKS + _HYBRID
    fields = _FIELDS

    def module(self, name: str, tensors: Mapping[str, Saved], config: Mapping[str, Any], folder: Path) -> MethodModule:
        r, k, hybrid_r = int(config.get("r", 32)), int(config.get("gralora_k", 2)), int(config.get("hybrid_r", 0))
        if set(tensors) != set(_BLOCKS + (_HYBRID if hybrid_r > 0 else ())):
            if set(_BLOCKS) <= set(tensors) and hybrid_r == 0:
                raise AdapterError(
                    f"`{folder}`: the GraLoRA module `{name}` has hybrid factors, but its config sets hybrid_r = 0, "
                    "so PEFT does not load them.",
                    fix="The adapter file does not match its adapter_config.json: save the adapter again with PEFT.",
                )
            raise incomplete(folder, name, set(tensors), self.name)
        if r % k != 0:
            raise AdapterError(
                f"`{folder}` sets r = {r} and gralora_k = {k}, but PEFT's GraloraConfig needs r to be a multiple of "
                "gralora_k.",
                fix="Correct the field that PEFT did not write, or save the adapter again with PEFT.",
            )
        a, b = tuple(tensors["gralora_A"].shape), tuple(tensors["gralora_B"].shape)
        if len(a) != 3 or len(b) != 3 or a[0] != k or b[0] != k or a[2] != r or b[1] != r:
            raise AdapterError(
                f"`{folder}`: the GraLoRA module `{name}` has gralora_A {list(a)} and gralora_B {list(b)}, but with "
                f"r = {r} and gralora_k = {k} PEFT makes them (k, in / k, r) and (k, r, out / k) and cannot load "
                "them.",
                fix="The adapter file does not match its adapter_config.json: save the adapter again with PEFT.",
            )
        alpha = float(config.get("alpha", 64))
        settings = (("r", r), ("k", k), ("hybrid_r", hybrid_r), ("alpha", alpha), ("scale", alpha / (r + hybrid_r)))
        return MethodModule(self.peft_type, name, tuple(tensors.items()), settings)

    def shape_problem(self, m: MethodModule, param: str, shape: tuple[int, ...], fan_in_fan_out: bool) -> str | None:
        if len(shape) != 2:
            return Unsupported(
                f"GraLoRA on a {len(shape)}-D weight is not merged (PEFT's GraLoRA adapts only Linear and Conv1D "
                "layers)"
            )
        out_features, in_features = (shape[1], shape[0]) if fan_in_fan_out else shape
        k, r, hybrid_r = m.setting("k"), m.setting("r"), m.setting("hybrid_r")
        if in_features % k != 0 or out_features % k != 0:
            return (
                f"PEFT's GraLoRA needs gralora_k = {k} to divide the layer's {out_features} output and {in_features} "
                "input features"
            )
        expected = {
            "gralora_A": (k, in_features // k, r),
            "gralora_B": (k, r, out_features // k),
            "gralora_A_general.weight": (hybrid_r, in_features),
            "gralora_B_general.weight": (out_features, hybrid_r),
        }
        for role, _ in m.tensors:
            if m.shape(role) != expected[role]:
                return (
                    f"the adapter's {role} {list(m.shape(role))} is not the {list(expected[role])} PEFT makes for "
                    f"{out_features} output and {in_features} input features"
                )
        return None

    def merge(
        self, m: MethodModule, param: str, weight: torch.Tensor, tensors: Mapping[str, torch.Tensor],
        fan_in_fan_out: bool,
    ) -> torch.Tensor:  # fmt: skip
        t = {role: adapter_float(tensor) for role, tensor in tensors.items()}
        out_features, in_features = (weight.shape[1], weight.shape[0]) if fan_in_fan_out else weight.shape
        delta_weight = _delta_weight(t, m.setting("k"), m.setting("r"), in_features, out_features)
        if m.setting("hybrid_r") > 0:
            delta_weight += t["gralora_B_general.weight"] @ t["gralora_A_general.weight"]
        delta_weight = (delta_weight.T if fan_in_fan_out else delta_weight) * m.setting("scale")
        weight += delta_weight
        return weight

    def describe(self, m: MethodModule) -> str:
        hybrid = f" + hybrid r={m.setting('hybrid_r')}" if m.setting("hybrid_r") else ""
        return (
            f"GraLoRA {m.setting('k')}x{m.setting('k')} blocks r={m.setting('r')}{hybrid} scale={m.setting('scale'):g}"
        )

    def summary(self, modules: tuple[MethodModule, ...]) -> str:
        return ", ".join(
            f"{field} = {span([m.setting(key) for m in modules])}"
            for field, key in (("r", "r"), ("gralora_k", "k"), ("hybrid_r", "hybrid_r"), ("alpha", "alpha"))
        )


def _delta_weight(
    t: Mapping[str, torch.Tensor], gralora_k: int, r: int, in_features: int, out_features: int
) -> torch.Tensor:
    """PEFT's ``Linear.get_delta_weight`` up to the hybrid part: the ``(out, in)`` block-wise product."""
    import torch

    gralora_A, gralora_B = t["gralora_A"], t["gralora_B"]
    device, dtype = gralora_A.device, gralora_A.dtype
    gralora_rank = r
    subblock_gralora_rank = gralora_rank // gralora_k
    l_indices = torch.arange(in_features, device=device)
    n_indices = l_indices // (in_features // gralora_k)
    i_indices = l_indices % (in_features // gralora_k)
    gralora_A_scattered = torch.zeros(in_features, gralora_k, gralora_rank, device=device, dtype=dtype)
    gralora_A_scattered.scatter_(
        1,
        n_indices.unsqueeze(1).unsqueeze(2).expand(-1, 1, gralora_rank),
        gralora_A[n_indices, i_indices, :].unsqueeze(1),
    )
    return (
        torch.einsum(
            "ikr, kro -> iko",
            gralora_A_scattered.view(in_features, gralora_k, gralora_k, subblock_gralora_rank)
            .permute(0, 2, 1, 3)
            .reshape(in_features, gralora_k, gralora_rank),
            gralora_B,
        )
        .reshape(in_features, out_features)
        .T
    )


METHOD = GraLoRA()
