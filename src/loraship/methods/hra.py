"""HRA (``peft_type: HRA``): ``W' = W @ H``, H a product of ``r`` Householder reflections of the input side.

PEFT 0.21: ``tuners/hra/layer.py`` (``HRALayer.update_layer``, ``HRALinear.get_delta_weight``,
``HRALinear.merge``, ``HRAConv2d.merge``) and ``tuners/hra/config.py`` (``HRAConfig``: ``r``, ``apply_GS``).
``hra_u`` is ``(in, r)`` for a Linear layer and ``(in * k * k, r)`` for a Conv2d with a ``k x k`` kernel
(PEFT sizes it with ``kernel_size[0]`` twice, and refuses ``groups > 1``); PEFT holds it in fp32.

``get_delta_weight`` (not reversed): without ``apply_GS`` every column is normalised
(``u / u.norm(dim=0)``), then ``H = I``; for ``i = 0..r-1``: ``H = H - 2 * H @ u_i @ u_i.t()`` (left to
right). With ``apply_GS`` the columns are Gram–Schmidt orthonormalised in order and ``H = I - 2 * Q @ Q.t()``.
The merge is ``W' = mm(W.to(H.dtype), H).to(W.dtype)``: one fp32 product, rounded once (a convolution's
weight viewed ``(out, in * k * k)`` for it and back). The bias is left alone. These are reproduced op for op.

PEFT 0.22 builds the same H in its compact WY form (``HRALayer._get_householder_vt``): V the normalised columns
(or, with ``apply_GS``, the Q of ``torch.linalg.qr``), ``T⁻¹ = I/2 + triu(VᵀV, 1)`` solved by
``solve_triangular`` (``T = 2I`` with ``apply_GS``), ``H = I - (V @ T) @ Vᵀ``: the same rotation, other last
bits. The merge follows the installed PEFT, so that it stays bit-identical to the PEFT users have.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraship.errors import AdapterError
from loraship.methods.base import Method, MethodModule, Saved, Unsupported, adapter_float, incomplete, span

if TYPE_CHECKING:
    import torch


#: adapter_config.json fields HRA reads, with what PEFT's HRAConfig expects.
_FIELDS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "r": ("a whole number from 1", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1),
    "apply_GS": ("true or false", lambda v: isinstance(v, bool)),
    "init_weights": ("true or false", lambda v: isinstance(v, bool)),
}


class HRA(Method):
    peft_type = "HRA"
    name = "HRA"
    kind = "multiplicative"
    roles = ("hra_u",)
    fields = _FIELDS

    def module(self, name: str, tensors: Mapping[str, Saved], config: Mapping[str, Any], folder: Path) -> MethodModule:
        info = tensors.get("hra_u")
        if info is None:
            raise incomplete(folder, name, set(tensors), self.name)
        shape = tuple(info.shape)
        r = int(config.get("r", 8))
        if len(shape) != 2 or shape[1] != r or shape[0] < 1:
            raise AdapterError(
                f"`{folder}`: the HRA module `{name}` has hra_u {list(shape)}, but with r = {r} in its config PEFT "
                f"makes it (in, {r}) and cannot load it.",
                fix="The adapter file does not match its adapter_config.json: save the adapter again with PEFT.",
            )
        settings = (("r", r), ("apply_GS", bool(config.get("apply_GS", False))))
        return MethodModule(self.peft_type, name, tuple(tensors.items()), settings)

    def shape_problem(self, m: MethodModule, param: str, shape: tuple[int, ...], fan_in_fan_out: bool) -> str | None:
        u = m.shape("hra_u")
        if fan_in_fan_out:
            return Unsupported(
                "HRA on a Conv1D layer (weights stored (in, out)) is not merged by loraship (PEFT's HRA adapts only "
                "Linear and Conv2d layers)"
            )
        if len(shape) == 2:
            if u[0] == shape[1]:
                return None
            return f"the adapter's hra_u {list(u)} needs a weight with {u[0]} input features"
        if len(shape) == 4:
            if shape[2] != shape[3]:
                return Unsupported(
                    f"HRA on a convolution with a non-square {shape[2]}x{shape[3]} kernel is not merged by loraship "
                    "(PEFT's HRA sizes hra_u for a square kernel)"
                )
            if u[0] == shape[1] * shape[2] * shape[3]:
                return None
            return (
                f"the adapter's hra_u {list(u)} needs a convolution with in_channels x kernel x kernel = {u[0]} "
                "(HRA does not support grouped convolutions)"
            )
        return Unsupported(
            f"HRA on a {len(shape)}-D weight is not merged (PEFT's HRA adapts only Linear and Conv2d layers)"
        )

    def merge(
        self, m: MethodModule, param: str, weight: torch.Tensor, tensors: Mapping[str, torch.Tensor],
        fan_in_fan_out: bool,
    ) -> torch.Tensor:  # fmt: skip
        import torch

        u = tensors["hra_u"]
        # PEFT 0.22's QR cannot make more reflections than the layer has inputs: such adapters come from 0.21
        build = _delta_weight_wy if _peft_builds_wy() and u.shape[1] <= u.shape[0] else _delta_weight
        delta_weight = build(adapter_float(tensors["hra_u"]), m.setting("r"), m.setting("apply_GS"))
        orig_dtype = weight.dtype
        if weight.dim() == 4:
            out, in_, k = weight.shape[0], weight.shape[1], weight.shape[2]
            orig_weight = weight.reshape(out, in_ * k * k)
            orig_weight = torch.mm(orig_weight.to(delta_weight.dtype), delta_weight)
            orig_weight = orig_weight.view(out, in_, k, k)
            return orig_weight.to(orig_dtype)
        new_weight = torch.mm(weight.to(delta_weight.dtype), delta_weight)
        return new_weight.to(orig_dtype)

    def describe(self, m: MethodModule) -> str:
        gs = " (Gram-Schmidt)" if m.setting("apply_GS") else ""
        return f"HRA {m.setting('r')} reflections{gs}"

    def summary(self, modules: tuple[MethodModule, ...]) -> str:
        gs = {bool(m.setting("apply_GS")) for m in modules}
        shown = "yes" if gs == {True} else "no" if gs == {False} else "mixed"
        return f"r = {span([m.setting('r') for m in modules])} Householder reflections, Gram-Schmidt: {shown}"


def _delta_weight(opt_u: torch.Tensor, rank: int, apply_GS: bool) -> torch.Tensor:
    """PEFT's ``HRALinear.get_delta_weight`` (``reverse=False``), op for op."""
    import torch

    shape = opt_u.shape
    if apply_GS:
        columns = [(opt_u[:, 0] / opt_u[:, 0].norm()).view(-1, 1)]
        for i in range(1, rank):
            ui = opt_u[:, i].view(-1, 1)
            for j in range(i):
                ui = ui - (columns[j].t() @ ui) * columns[j]
            columns.append((ui / ui.norm()).view(-1, 1))
        q = torch.cat(columns, dim=1)
        return torch.eye(shape[0], device=opt_u.device, dtype=opt_u.dtype) - 2 * q @ q.t()
    opt_u = opt_u / opt_u.norm(dim=0)
    weight = torch.eye(shape[0], device=opt_u.device, dtype=opt_u.dtype)
    for i in range(rank):
        ui = opt_u[:, i].view(-1, 1)
        weight = weight - 2 * weight @ ui @ ui.t()
    return weight


def _delta_weight_wy(opt_u: torch.Tensor, rank: int, apply_GS: bool) -> torch.Tensor:
    """PEFT 0.22's ``HRALayer.get_delta_weight`` (``reverse=False``, through ``_get_householder_vt``), op for op."""
    import torch

    compute_dtype = torch.promote_types(opt_u.dtype, torch.float32)
    eye = torch.eye(rank, device=opt_u.device, dtype=compute_dtype)
    if apply_GS:
        v = torch.linalg.qr(opt_u.to(compute_dtype), mode="reduced").Q
        t = 2 * eye
    else:
        v = opt_u.to(compute_dtype)
        v = v / v.norm(dim=0)
        tinv = 0.5 * eye + torch.triu(v.T @ v, diagonal=1)
        t = torch.linalg.solve_triangular(tinv, eye, upper=True)
    weight = torch.eye(v.shape[0], device=v.device, dtype=v.dtype) - (v @ t) @ v.T
    return weight.to(opt_u.dtype)


def _peft_builds_wy() -> bool:
    """Whether the installed PEFT builds H in the compact WY form (0.22 and later), read from its metadata."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        major, minor = (int(part) for part in version("peft").split(".")[:2])
    except (PackageNotFoundError, ValueError):
        return False
    return (major, minor) >= (0, 22)


METHOD = HRA()
