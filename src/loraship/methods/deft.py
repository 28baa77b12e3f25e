"""DEFT (``peft_type: DEFT``): ``W' = (I - P_proj) W + Q_P R``, i.e. ``W + Q_P (R · scale - rightᵀ W)``.

PEFT 0.21: ``tuners/deft/layer.py`` (``DeftLayer.update_layer``, ``DeftLinear._project``, ``_merge_factor``,
``_delta_from_factor``, ``merge``) and ``tuners/deft/config.py`` (``DeftConfig``: ``r``, ``alpha``,
``decomposition_method``, ``para``). ``deft_P`` is ``(out, r)`` and ``deft_R`` ``(r, in)`` (none with ``para``, the
PaRa method), where PEFT caps ``r`` at the layer's output features; PEFT holds them in fp32 and adapts Linear and
Conv1D layers only.

All in fp32: ``P`` gives ``(Q_P, right)``: ``(P, relu(P))`` with ``decomposition_method = "relu"``, ``(Q, Q)`` from
``torch.linalg.qr(P)`` with ``"qr"``. The factor ``rightᵀ @ W`` (W in fp32, transposed to (out, in) for a Conv1D);
the delta ``Q_P @ (R * scale - factor)`` (``-(Q_P @ factor)`` with ``para``), ``scale = alpha / r`` (1.0 when
``alpha`` is unset or 0), transposed back for a Conv1D and rounded to W's dtype; the merge ``W + delta`` in W's dtype.
The bias is left alone; dropout is training only. These are reproduced op for op.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraship.errors import AdapterError
from loraship.methods.base import Method, MethodModule, Saved, Unsupported, adapter_float, incomplete, span

if TYPE_CHECKING:
    import torch


def _is_whole(v: Any, least: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= least


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


#: adapter_config.json fields DEFT reads, with what PEFT's DeftConfig expects.
_FIELDS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "r": ("a whole number from 1", lambda v: _is_whole(v, 1)),
    "alpha": ("a number (or null: no scaling)", _is_number),
    "decomposition_method": ('"relu" or "qr"', lambda v: v in ("relu", "qr")),
    "para": ("true or false", lambda v: isinstance(v, bool)),
    "fan_in_fan_out": ("true or false", lambda v: isinstance(v, bool)),
    "init_weights": ("true or false", lambda v: isinstance(v, bool)),
    "init_scale": ("a number", _is_number),
    "deft_dropout": ("a number", _is_number),
}


class DEFT(Method):
    peft_type = "DEFT"
    name = "DEFT"
    kind = "multiplicative"
    roles = ("deft_P", "deft_R")
    fields = _FIELDS

    def module(self, name: str, tensors: Mapping[str, Saved], config: Mapping[str, Any], folder: Path) -> MethodModule:
        para = bool(config.get("para", False))
        if para and "deft_R" in tensors:
            raise AdapterError(
                f"`{folder}`: the DEFT module `{name}` has deft_R, but its config sets para = true (PaRa), for which "
                "PEFT makes no deft_R and cannot load it.",
                fix="The adapter file does not match its adapter_config.json: save the adapter again with PEFT.",
            )
        if set(tensors) != ({"deft_P"} if para else {"deft_P", "deft_R"}):
            raise incomplete(folder, name, set(tensors), "PaRa (DEFT with para)" if para else self.name)
        p = tuple(tensors["deft_P"].shape)
        config_r = int(config.get("r", 8))
        r = min(config_r, p[0]) if len(p) == 2 else config_r
        r_shape = tuple(tensors["deft_R"].shape) if not para else None
        if len(p) != 2 or p[1] != r or (r_shape is not None and (len(r_shape) != 2 or r_shape[0] != r)):
            shown = f"deft_P {list(p)}" + (f" and deft_R {list(r_shape)}" if r_shape is not None else "")
            made = "(out, r)" + (" and (r, in)" if not para else "")
            raise AdapterError(
                f"`{folder}`: the DEFT module `{name}` has {shown}, but with r = {config_r} in its config PEFT makes "
                f"them {made} (r capped at the output features) and cannot load them.",
                fix="The adapter file does not match its adapter_config.json: save the adapter again with PEFT.",
            )
        alpha = config.get("alpha")
        scale = (alpha / r) if alpha else 1.0
        settings = (
            ("r", r),
            ("scale", scale),
            ("decomposition", str(config.get("decomposition_method", "relu"))),
            ("para", para),
        )
        return MethodModule(self.peft_type, name, tuple(sorted(tensors.items())), settings)

    def shape_problem(self, m: MethodModule, param: str, shape: tuple[int, ...], fan_in_fan_out: bool) -> str | None:
        if len(shape) != 2:
            return Unsupported(
                f"DEFT on a {len(shape)}-D weight is not merged (PEFT's DEFT adapts only Linear and Conv1D layers)"
            )
        out_f, in_f = (shape[1], shape[0]) if fan_in_fan_out else shape
        p = m.shape("deft_P")
        if p[0] != out_f:
            return f"the adapter's deft_P {list(p)} needs a layer with {p[0]} output features"
        if not m.setting("para") and m.shape("deft_R")[1] != in_f:
            r = m.shape("deft_R")
            return f"the adapter's deft_R {list(r)} needs a layer with {r[1]} input features"
        return None

    def merge(
        self, m: MethodModule, param: str, weight: torch.Tensor, tensors: Mapping[str, torch.Tensor],
        fan_in_fan_out: bool,
    ) -> torch.Tensor:  # fmt: skip
        import torch

        P = adapter_float(tensors["deft_P"])
        W = weight.to(torch.float32)
        W = W.T if fan_in_fan_out else W
        _, right = _project(P, m.setting("decomposition"))
        factor = right.transpose(0, 1) @ W
        Q_P, _ = _project(P, m.setting("decomposition"))
        if m.setting("para"):
            delta = -(Q_P @ factor)
        else:
            R = adapter_float(tensors["deft_R"]).to(torch.float32) * m.setting("scale")
            delta = Q_P @ (R - factor)
        delta = delta.T if fan_in_fan_out else delta
        return weight + delta.to(weight.dtype)

    def describe(self, m: MethodModule) -> str:
        kind = "PaRa (DEFT, subspace removal only)" if m.setting("para") else "DEFT"
        return f"{kind} r={m.setting('r')} ({m.setting('decomposition')} projection)"

    def summary(self, modules: tuple[MethodModule, ...]) -> str:
        parts = [f"r = {span([m.setting('r') for m in modules])}"]
        parts += sorted({f"{m.setting('decomposition')} projection" for m in modules})
        if any(m.setting("para") for m in modules):
            parts.append("PaRa (subspace removal only)")
        else:
            parts.append(f"injection scale = {span([m.setting('scale') for m in modules])}")
        return ", ".join(parts)


def _project(P: torch.Tensor, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's ``DeftLinear._project``: ``(Q_P, right)`` in fp32."""
    import torch

    P = P.to(torch.float32)
    if method == "relu":
        return P, torch.relu(P)
    Q_P, _ = torch.linalg.qr(P)
    return Q_P, Q_P


METHOD = DEFT()
