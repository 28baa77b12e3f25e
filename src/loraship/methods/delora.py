"""DeLoRA (``peft_type: DELORA``): ``W' = W + (B @ diag(λ / r / (‖A_i‖ ‖B_i‖)) @ A) * w_norm``.

PEFT 0.21: ``tuners/delora/layer.py`` (``DeloraLayer._compute_delta``, ``get_delta_weight``, ``update_layer``,
``reset_delora_parameters``, ``DeloraLinear.merge``), ``tuners/delora/model.py`` (``_create_and_replace``: ``r`` from
``rank_pattern``, the initial λ from ``lambda_pattern``; ``_create_new_module``: Linear layers only) and
``tuners/delora/config.py`` (``DeloraConfig``: ``r = 8``, ``delora_lambda = 15``).

Per module PEFT saves ``delora_A (r, in)``, ``delora_B (out, r)``, the trained ``delora_lambda (1)`` and the buffer
``delora_w_norm (in)``: the base weight's column norms when training started (all fp32: PEFT upcasts half-precision
adapter parameters and buffers on load). ``_compute_delta``: ``An = clamp(A.norm(dim=1), min=1e-4)``,
``Bn = clamp(B.norm(dim=0), min=1e-4)``, ``B @ diag_embed(λ / r / (An * Bn)) @ A`` (left to right), times
``w_norm`` column-wise, ``r`` the module's rank (a Python int). The merge casts that fp32 delta to **W's dtype** and
adds it in place there (``W.add_(delta.to(W.dtype))``): on a bf16 or fp16 base two roundings, reproduced as they are.
``module_dropout`` is training only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraship.errors import AdapterError
from loraship.methods.base import (
    Method,
    MethodModule,
    Saved,
    Unsupported,
    _is_number,
    adapter_float,
    incomplete,
    pattern_key,
    span,
)

if TYPE_CHECKING:
    import torch

_ROLES = ("delora_A", "delora_B", "delora_lambda", "delora_w_norm")


def _is_whole(v: Any, least: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= least


#: adapter_config.json fields DeLoRA reads, with what PEFT's DeloraConfig expects.
_FIELDS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "r": ("a whole number from 1", lambda v: _is_whole(v, 1)),
    "delora_lambda": ("a number", _is_number),
    "rank_pattern": ("a mapping of names to ranks", lambda v: isinstance(v, dict) and all(
        _is_whole(x, 1) for x in v.values())),
    "lambda_pattern": ("a mapping of names to numbers", lambda v: isinstance(v, dict) and all(
        _is_number(x) for x in v.values())),
    "module_dropout": ("a number", _is_number),
    "init_weights": ("true or false", lambda v: isinstance(v, bool)),
}  # fmt: skip


class DeLoRA(Method):
    peft_type = "DELORA"
    name = "DeLoRA"
    roles = _ROLES
    fields = _FIELDS

    def module(self, name: str, tensors: Mapping[str, Saved], config: Mapping[str, Any], folder: Path) -> MethodModule:
        if set(tensors) != set(_ROLES):
            raise incomplete(folder, name, set(tensors), self.name)
        ranks = dict(config.get("rank_pattern") or {})
        key = pattern_key(ranks, name)
        r = int(ranks[key]) if key is not None else int(config.get("r", 8))
        a, b = tuple(tensors["delora_A"].shape), tuple(tensors["delora_B"].shape)
        lam, norm = tuple(tensors["delora_lambda"].shape), tuple(tensors["delora_w_norm"].shape)
        if len(a) != 2 or len(b) != 2 or a[0] != r or b[1] != r or lam != (1,) or norm != (a[1],):
            raise AdapterError(
                f"`{folder}`: the DeLoRA module `{name}` has delora_A {list(a)}, delora_B {list(b)}, delora_lambda "
                f"{list(lam)} and delora_w_norm {list(norm)}, but with r = {r} PEFT makes them (r, in), (out, r), "
                "(1) and (in) and cannot load them.",
                fix="The adapter file does not match its adapter_config.json: save the adapter again with PEFT.",
            )
        return MethodModule(self.peft_type, name, tuple(tensors.items()), (("r", r),))

    def shape_problem(self, m: MethodModule, param: str, shape: tuple[int, ...], fan_in_fan_out: bool) -> str | None:
        if fan_in_fan_out or len(shape) != 2:
            kind = "Conv1D layer (weights stored (in, out))" if fan_in_fan_out else f"{len(shape)}-D weight"
            return Unsupported(f"DeLoRA on a {kind} is not merged (PEFT's DeLoRA adapts only Linear layers)")
        a, b = m.shape("delora_A"), m.shape("delora_B")
        if (b[0], a[1]) == shape:
            return None
        return f"the adapter's delora_B {list(b)} @ delora_A {list(a)} makes {[b[0], a[1]]}"

    def merge(
        self, m: MethodModule, param: str, weight: torch.Tensor, tensors: Mapping[str, torch.Tensor],
        fan_in_fan_out: bool,
    ) -> torch.Tensor:  # fmt: skip
        t = {role: adapter_float(tensors[role]) for role in _ROLES}
        delta = _compute_delta(t["delora_A"], t["delora_B"], t["delora_lambda"], m.setting("r"), t["delora_w_norm"])
        weight.add_(delta.to(dtype=weight.dtype))
        return weight

    def describe(self, m: MethodModule) -> str:
        return f"DeLoRA r={m.setting('r')}"

    def summary(self, modules: tuple[MethodModule, ...]) -> str:
        return f"r = {span([m.setting('r') for m in modules])} (λ and the column norms as trained and saved)"


def _compute_delta(
    A: torch.Tensor, B: torch.Tensor, delora_lambda: torch.Tensor, r: int, w_norm: torch.Tensor
) -> torch.Tensor:
    """PEFT's ``DeloraLayer._compute_delta``, op for op."""
    import torch

    An = torch.clamp(A.norm(dim=1), min=1e-4)
    Bn = torch.clamp(B.norm(dim=0), min=1e-4)
    diag = torch.diag_embed(delora_lambda / r / (An * Bn))
    delta = B @ diag @ A
    delta = delta * w_norm.unsqueeze(0)
    return delta


METHOD = DeLoRA()
