"""PEANuT (``peft_type: PEANUT``): ``W' = W + f(W)``, a small non-linear network of the base weight itself.

PEFT 0.21: ``tuners/peanut/layer.py`` (``PeanutLayer.update_layer``, ``Linear._compute_delta_weight``,
``Linear.merge``) and ``tuners/peanut/config.py`` (``PeanutConfig``: ``r``, ``depth``, ``act_fn``, ``scaling``).
Saved per module: ``peanut_A.weight`` ``(r, out)``, ``peanut_B.weight`` ``(out, r)`` and ``depth`` encoders and
decoders ``peanut_encoders.<i>.weight``, ``peanut_decoders.<i>.weight`` ``(r, r)`` (bias-free ``nn.Linear``); PEFT
holds them in fp32 and adapts Linear layers only.

``_compute_delta_weight`` (all in fp32): ``h = act(Wᵀ @ Aᵀ)`` (``(in, r)``); ``depth`` times keep ``h`` as a residual
and ``h = act(linear(h, enc_i))``; then ``depth`` times ``h = act(linear(h, dec_i)) + residual`` (the residuals in
reverse order); ``linear(h, B) * scaling``, transposed to ``(out, in)``. The merge rounds it to W's dtype and adds it
in place (``W.add_(delta)``). ``act`` is transformers' ``ACT2FN[act_fn]``; loraship reproduces the activations named
in :data:`ACTIVATIONS` with their exact torch ops and refuses the others. The bias is left alone. These are
reproduced op for op.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraship.errors import AdapterError, UnsupportedError
from loraship.methods.base import Method, MethodModule, Saved, Unsupported, adapter_float, incomplete, span

if TYPE_CHECKING:
    import torch

#: Encoder/decoder pairs loraship reads (PEFT's ``depth``; papers use a handful).
_MAX_DEPTH = 64

#: transformers' ``ACT2FN`` names loraship reproduces (the same torch ops as transformers' activation modules).
ACTIVATIONS = (
    "relu", "gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh", "quick_gelu", "silu", "swish", "tanh", "sigmoid",
    "leaky_relu", "linear",
)  # fmt: skip


def _is_whole(v: Any, least: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= least


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


#: adapter_config.json fields PEANuT reads, with what PEFT's PeanutConfig expects.
_FIELDS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "r": ("a whole number from 1", lambda v: _is_whole(v, 1)),
    "depth": ("a whole number from 0", lambda v: _is_whole(v, 0)),
    "act_fn": ("an activation name of transformers' ACT2FN", lambda v: isinstance(v, str)),
    "scaling": ("a number", _is_number),
    "init_weights": ("true or false", lambda v: isinstance(v, bool)),
}


class PEANuT(Method):
    peft_type = "PEANUT"
    name = "PEANuT"
    kind = "multiplicative"
    roles = (
        "peanut_A.weight",
        "peanut_B.weight",
        *(f"peanut_{part}.{i}.weight" for part in ("encoders", "decoders") for i in range(_MAX_DEPTH)),
    )
    fields = _FIELDS

    def module(self, name: str, tensors: Mapping[str, Saved], config: Mapping[str, Any], folder: Path) -> MethodModule:
        act_fn = str(config.get("act_fn", "relu"))
        if act_fn not in ACTIVATIONS:
            raise UnsupportedError(
                f"`{folder}` is a PEANuT adapter with act_fn = {act_fn!r}, an activation loraship does not reproduce "
                f"(it merges PEANuT with {', '.join(ACTIVATIONS)}).",
                fix="Merge it with PEFT itself: PeftModel.from_pretrained(base, adapter).merge_and_unload(), then "
                "check the result with `loraship verify`.",
            )
        depth = int(config.get("depth", 0))
        layers = {f"peanut_{part}.{i}.weight" for part in ("encoders", "decoders") for i in range(depth)}
        if set(tensors) != {"peanut_A.weight", "peanut_B.weight"} | layers:
            raise incomplete(folder, name, set(tensors), f"PEANuT (depth {depth})")
        a, b = tuple(tensors["peanut_A.weight"].shape), tuple(tensors["peanut_B.weight"].shape)
        r = a[0] if len(a) == 2 else -1
        squares = all(tuple(tensors[role].shape) == (r, r) for role in layers)
        if len(a) != 2 or len(b) != 2 or b != (a[1], r) or not squares:
            raise AdapterError(
                f"`{folder}`: the PEANuT module `{name}` has peanut_A {list(a)} and peanut_B {list(b)}"
                + (" and encoders/decoders not all (r, r)" if not squares else "")
                + ", but PEFT makes them (r, out), (out, r) and (r, r) and cannot load them.",
                fix="The adapter file is damaged or not PEFT's: save the adapter again with PEFT.",
            )
        settings = (("r", r), ("depth", depth), ("act_fn", act_fn), ("scaling", float(config.get("scaling", 1.0))))
        return MethodModule(self.peft_type, name, tuple(sorted(tensors.items())), settings)

    def shape_problem(self, m: MethodModule, param: str, shape: tuple[int, ...], fan_in_fan_out: bool) -> str | None:
        if fan_in_fan_out or len(shape) != 2:
            return Unsupported(
                "PEANuT on a layer other than a Linear one is not merged (PEFT's PEANuT adapts Linear layers)"
            )
        a = m.shape("peanut_A.weight")
        if shape[0] == a[1]:
            return None
        return f"the adapter's peanut_A {list(a)} needs a layer with {a[1]} output features"

    def merge(
        self, m: MethodModule, param: str, weight: torch.Tensor, tensors: Mapping[str, torch.Tensor],
        fan_in_fan_out: bool,
    ) -> torch.Tensor:  # fmt: skip
        import torch
        import torch.nn.functional as F

        t = {role: adapter_float(v) for role, v in tensors.items()}
        non_linear = _activation(m.setting("act_fn"))
        res_num = m.setting("depth")
        peanut_A = t["peanut_A.weight"]
        base_weight_t = weight.transpose(0, 1).to(peanut_A.dtype)
        delta_w = non_linear(torch.matmul(base_weight_t, peanut_A.t()))
        residuals = []
        for i in range(res_num):
            residuals.append(delta_w)
            delta_w = non_linear(F.linear(delta_w, t[f"peanut_encoders.{i}.weight"]))
        for i in range(res_num):
            delta_w = non_linear(F.linear(delta_w, t[f"peanut_decoders.{i}.weight"]))
            delta_w = delta_w + residuals[res_num - 1 - i]
        delta_w = F.linear(delta_w, t["peanut_B.weight"])
        delta_weight = (delta_w * m.setting("scaling")).transpose(0, 1)
        weight.add_(delta_weight.to(dtype=weight.dtype))
        return weight

    def describe(self, m: MethodModule) -> str:
        return f"PEANuT r={m.setting('r')} depth={m.setting('depth')} {m.setting('act_fn')} x{m.setting('scaling'):g}"

    def summary(self, modules: tuple[MethodModule, ...]) -> str:
        acts = ", ".join(sorted({m.setting("act_fn") for m in modules}))
        return (
            f"r = {span([m.setting('r') for m in modules])}, depth = {span([m.setting('depth') for m in modules])}, "
            f"{acts}, scaling = {span([m.setting('scaling') for m in modules])}"
        )


def _activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """transformers' ``ACT2FN[name]`` forward, op for op (for the names of :data:`ACTIVATIONS`)."""
    import torch
    import torch.nn.functional as F

    def gelu_new(x: torch.Tensor) -> torch.Tensor:  # NewGELUActivation
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))

    def gelu_fast(x: torch.Tensor) -> torch.Tensor:  # FastGELUActivation
        return 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))

    def quick_gelu(x: torch.Tensor) -> torch.Tensor:  # QuickGELUActivation
        return x * torch.sigmoid(1.702 * x)

    found: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "relu": F.relu,  # nn.ReLU
        "gelu": F.gelu,  # GELUActivation
        "gelu_new": gelu_new,
        "gelu_fast": gelu_fast,
        "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),  # GELUTanh
        "quick_gelu": quick_gelu,
        "silu": F.silu,  # SiLUActivation
        "swish": F.silu,  # nn.SiLU
        "tanh": torch.tanh,  # nn.Tanh
        "sigmoid": torch.sigmoid,  # nn.Sigmoid
        "leaky_relu": lambda x: F.leaky_relu(x, 0.01),  # nn.LeakyReLU()
        "linear": lambda x: x,  # LinearActivation
    }
    return found[name]


METHOD = PEANuT()
