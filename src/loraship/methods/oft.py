"""OFT (``peft_type: OFT``): ``W' = W @ R_bdᵀ``, R_bd a block-diagonal rotation of the layer's input side.

PEFT 0.21: ``tuners/oft/layer.py`` (``OFTLayer.update_layer``, ``OFTLayer.adjust_oft_parameters``,
``OFTRotationModule.get_weight``, ``_pytorch_skew_symmetric``, ``_project_batch``, ``_cayley_batch``,
``_block_diagonal``, ``Linear.get_delta_weight``, ``Linear.merge``, ``Conv2d.merge``, ``Embedding.merge``) and
``tuners/oft/config.py`` (``OFTConfig``: exactly one of ``r`` and ``oft_block_size`` is non-zero; the default
is ``r = 0, oft_block_size = 32``; ``check_kwargs`` refuses a config without ``oft_block_size``, PEFT < 0.14).

``oft_R.weight`` (``oft_embedding_R.weight`` on an Embedding) is ``(blocks, b(b-1)/2)``: each row the strict upper
triangle (``triu_indices(b, b, 1)`` order) of a ``b x b`` block, one row with ``block_share``. PEFT sizes the
blocks from the layer's input features (``in``; ``in * k * k`` for a Conv2d with a ``k x k`` kernel, the embedding
width for an Embedding), moving an ``r`` or block size that does not divide them to the nearest divisor. Per
block: ``Q = U - Uᵀ``; with ``coft`` first projected onto a ball of radius ``eps / sqrt(blocks)``; then either
the Cayley–Neumann series ``I + 2Q + 2Q² + … + Q^(n-1)`` (``num_cayley_neumann_terms`` = n, the default) or
the exact ``solve(I + Q, I - Q, left=False)``; ``block_diag`` of the blocks (the one block repeated
``in / b`` times with ``block_share``). All in fp32 (PEFT upcasts a half-precision adapter on load).

The merge: Linear ``W.copy_(mm(R_bd, Wᵀ.to(fp32))ᵀ)``; Conv2d the same on W viewed ``(out, in * k * k)``;
Embedding ``W.copy_(mm(W.to(fp32), R_bd))``: one fp32 product, rounded once to W's dtype. Biases are left
alone; ``module_dropout`` is training only. These are reproduced op for op.
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

_LINEAR = "oft_R.weight"
_EMBEDDING = "oft_embedding_R.weight"


def _is_whole(v: Any, least: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= least


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_bool(v: Any) -> bool:
    return isinstance(v, bool)


#: adapter_config.json fields OFT reads, with what PEFT's OFTConfig expects.
_FIELDS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "r": ("a whole number from 0 (the number of blocks; 0: set by oft_block_size)", lambda v: _is_whole(v, 0)),
    "oft_block_size": ("a whole number from 0 (0: set by r)", lambda v: _is_whole(v, 0)),
    "coft": ("true or false", _is_bool),
    "eps": ("a number", _is_number),
    "block_share": ("true or false", _is_bool),
    "use_cayley_neumann": ("true or false", _is_bool),
    "num_cayley_neumann_terms": ("a whole number from 0", lambda v: _is_whole(v, 0)),
    "module_dropout": ("a number", _is_number),
    "fan_in_fan_out": ("true or false", _is_bool),
    "init_weights": ("true or false", _is_bool),
}


class OFT(Method):
    peft_type = "OFT"
    name = "OFT"
    kind = "multiplicative"
    roles = (_LINEAR, _EMBEDDING)
    fields = _FIELDS

    def module(self, name: str, tensors: Mapping[str, Saved], config: Mapping[str, Any], folder: Path) -> MethodModule:
        role = _LINEAR if _LINEAR in tensors else _EMBEDDING if _EMBEDDING in tensors else None
        if role is None or len(tensors) != 1:
            raise incomplete(folder, name, set(tensors), self.name)
        if "oft_block_size" not in config:
            raise AdapterError(
                f"`{folder}`: its adapter_config.json has no `oft_block_size`: it is an OFT adapter of PEFT before "
                "0.14, whose weights PEFT 0.14 and later refuse to load.",
                fix="Retrain the adapter with a newer PEFT, or merge it with PEFT 0.13.",
            )
        r, block_size = int(config.get("r", 0)), int(config.get("oft_block_size", 32))
        if (r != 0) == (block_size != 0):
            raise AdapterError(
                f"`{folder}` sets r = {r} and oft_block_size = {block_size}, but PEFT's OFTConfig needs exactly one "
                "of them non-zero (r x oft_block_size = the layer's input features).",
                fix="Correct the field that PEFT did not write, or save the adapter again with PEFT.",
            )
        shape = tuple(tensors[role].shape)
        share = bool(config.get("block_share", False))
        b = _block_size(shape[1]) if len(shape) == 2 else None
        if b is None or shape[0] < 1 or (share and shape[0] != 1):
            made = "(1, b(b-1)/2) with block_share" if share else "(blocks, b(b-1)/2)"
            raise AdapterError(
                f"`{folder}`: the OFT module `{name}` has {role} {list(shape)}, but PEFT makes it {made} for a "
                "block size b and cannot load it.",
                fix="The adapter file does not match its adapter_config.json: save the adapter again with PEFT.",
            )
        settings = (
            ("embedding", role == _EMBEDDING),
            ("config_r", r),
            ("config_block_size", block_size),
            ("block_size", b),
            ("blocks", shape[0]),
            ("block_share", share),
            ("coft", bool(config.get("coft", False))),
            ("eps", float(config.get("eps", 6e-5))),
            ("cayley_neumann", bool(config.get("use_cayley_neumann", True))),
            ("terms", int(config.get("num_cayley_neumann_terms", 5))),
        )
        return MethodModule(self.peft_type, name, tuple(tensors.items()), settings)

    def shape_problem(self, m: MethodModule, param: str, shape: tuple[int, ...], fan_in_fan_out: bool) -> str | None:
        role = _EMBEDDING if m.setting("embedding") else _LINEAR
        saved = m.shape(role)
        if fan_in_fan_out:
            return Unsupported(
                "OFT on a Conv1D layer (weights stored (in, out)) is not merged by loraship (PEFT's OFT adapts only "
                "Linear, Conv2d and Embedding layers)"
            )
        if len(shape) == 2:
            in_features, what = shape[1], ("embedding width" if m.setting("embedding") else "input features")
        elif len(shape) == 4 and not m.setting("embedding"):
            if shape[2:] != (1, 1):
                return Unsupported(
                    f"OFT on a {shape[2]}x{shape[3]} convolution is not merged: PEFT rotates the unfolded input "
                    "patches and folds them back, and no convolution weight (PEFT's merged one included, which "
                    "rotates the flattened kernel) behaves like that, so the merged model would not behave like "
                    "base + adapter (loraship merges OFT on 1x1 convolutions, Linear and Embedding layers)"
                )
            in_features, what = shape[1] * shape[2] * shape[3], "in_channels x kernel x kernel"
        else:
            return Unsupported(
                f"OFT on a {len(shape)}-D weight is not merged (PEFT's OFT adapts only Linear, Conv2d and Embedding "
                "layers)"
            )
        r, b = _layout(in_features, m.setting("config_r"), m.setting("config_block_size"))
        expected = (1 if m.setting("block_share") else r, b * (b - 1) // 2)
        if saved == expected:
            return None
        grouped = " (OFT does not support grouped convolutions)" if len(shape) == 4 else ""
        return (
            f"the adapter's {role.partition('.')[0]} {list(saved)} is not the {list(expected)} PEFT makes for "
            f"{what} = {in_features} (blocks of {b}){grouped}"
        )

    def merge(
        self, m: MethodModule, param: str, weight: torch.Tensor, tensors: Mapping[str, torch.Tensor],
        fan_in_fan_out: bool,
    ) -> torch.Tensor:  # fmt: skip
        import torch

        if m.setting("embedding"):
            oft_mat = _get_weight(m, adapter_float(tensors[_EMBEDDING]), weight.shape[1])
            result = torch.mm(weight.to(oft_mat.dtype), oft_mat)
            weight.copy_(result)
            return weight
        flat = weight.view(weight.shape[0], -1) if weight.dim() == 4 else weight
        oft_mat = _get_weight(m, adapter_float(tensors[_LINEAR]), flat.shape[1])
        result = torch.mm(oft_mat, flat.t().to(oft_mat.dtype))
        flat.copy_(result.t())
        return weight

    def describe(self, m: MethodModule) -> str:
        b = m.setting("block_size")
        blocks = f"one block of {b} shared" if m.setting("block_share") else f"{m.setting('blocks')} blocks of {b}"
        return f"OFT{' (embedding)' if m.setting('embedding') else ''} {blocks} ({_parametrization(m)})"

    def summary(self, modules: tuple[MethodModule, ...]) -> str:
        parts = [f"block size = {span([m.setting('block_size') for m in modules])}"]
        parts += sorted({_parametrization(m) for m in modules})
        shared = {bool(m.setting("block_share")) for m in modules}
        if True in shared:
            parts.append("blocks shared" if shared == {True} else "blocks shared in some modules")
        return ", ".join(parts)


def _parametrization(m: MethodModule) -> str:
    kind = f"Cayley-Neumann, {m.setting('terms')} terms" if m.setting("cayley_neumann") else "exact Cayley"
    return kind + (f", COFT eps={m.setting('eps'):g}" if m.setting("coft") else "")


def _block_size(n_elements: int) -> int | None:
    """``b`` with ``b(b-1)/2 = n_elements`` (None when there is none)."""
    b = (1 + math.isqrt(1 + 8 * n_elements)) // 2
    return b if b * (b - 1) // 2 == n_elements else None


def _adjust(in_features: int, params: int) -> int:
    """PEFT's ``OFTLayer.adjust_oft_parameters``: the divisor of ``in_features`` nearest ``params``."""
    if params < in_features:
        higher = params
        while higher <= in_features and in_features % higher != 0:
            higher += 1
    else:
        return in_features
    lower = params
    while lower > 1 and in_features % lower != 0:
        lower -= 1
    return lower if (params - lower) <= (higher - params) else higher


def _layout(in_features: int, r: int, block_size: int) -> tuple[int, int]:
    """PEFT's ``update_layer``: the number of blocks and their size for a layer of ``in_features``."""
    if r == 0:
        if in_features % block_size != 0 or block_size > in_features:
            block_size = _adjust(in_features, block_size)
        return in_features // block_size, block_size
    if in_features % r != 0 or r > in_features:
        r = _adjust(in_features, r)
    return r, in_features // r


def _skew(vec: torch.Tensor, block_size: int, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """PEFT's ``_pytorch_skew_symmetric``."""
    import torch

    matrix = torch.zeros(vec.shape[0], block_size, block_size, device=vec.device, dtype=vec.dtype)
    matrix[:, rows, cols] = vec
    matrix = matrix - matrix.transpose(-2, -1)
    return matrix


def _project_batch(
    Q: torch.Tensor, eps: float, block_size: int, rows: torch.Tensor, cols: torch.Tensor
) -> torch.Tensor:
    """PEFT's ``_project_batch`` (COFT), op for op."""
    import torch

    oft_R = _skew(Q, block_size, rows, cols)
    eps = eps * 1 / torch.sqrt(torch.tensor(oft_R.shape[0]))  # type: ignore[assignment]
    I = (  # noqa: E741
        torch.zeros((oft_R.size(1), oft_R.size(1)), device=oft_R.device, dtype=oft_R.dtype)
        .unsqueeze(0)
        .expand_as(oft_R)
    )
    diff = oft_R - I
    norm_diff = torch.norm(oft_R - I, dim=(1, 2), keepdim=True)
    mask = (norm_diff <= eps).bool()
    out = torch.where(mask, oft_R, I + eps * (diff / norm_diff))
    return out[:, rows, cols]


def _cayley_batch(
    Q: torch.Tensor, block_size: int, use_cayley_neumann: bool, num_neumann_terms: int, rows: torch.Tensor,
    cols: torch.Tensor,
) -> torch.Tensor:  # fmt: skip
    """PEFT's ``_cayley_batch``, op for op."""
    import torch

    b, _ = Q.shape
    previous_dtype = Q.dtype
    Q_skew = _skew(Q, block_size, rows, cols)
    if use_cayley_neumann:
        R = torch.eye(block_size, device=Q.device, dtype=Q.dtype).repeat(b, 1, 1)
        if num_neumann_terms > 1:
            R.add_(Q_skew, alpha=2.0)
            if num_neumann_terms > 2:
                Q_squared = torch.bmm(Q_skew, Q_skew)
                R.add_(Q_squared, alpha=2.0)
                Q_power = Q_squared
                for _ in range(3, num_neumann_terms - 1):
                    Q_power = torch.bmm(Q_power, Q_skew)
                    R.add_(Q_power, alpha=2.0)
                Q_power = torch.bmm(Q_power, Q_skew)
                R.add_(Q_power)
    else:
        n = Q_skew.shape[-1]
        id_mat = torch.eye(n, device=Q_skew.device).unsqueeze(0).expand(b, n, n)
        R = torch.linalg.solve(id_mat + Q_skew, id_mat - Q_skew, left=False)
    return R.to(previous_dtype)


def _get_weight(m: MethodModule, weight: torch.Tensor, in_features: int) -> torch.Tensor:
    """PEFT's ``OFTRotationModule.get_weight`` (with ``_block_diagonal``): the ``in x in`` rotation."""
    import torch

    block_size = m.setting("block_size")
    rows, cols = torch.triu_indices(block_size, block_size, 1)
    if m.setting("coft"):
        with torch.no_grad():
            weight = _project_batch(weight, m.setting("eps"), block_size, rows, cols)
    orth_rotate = _cayley_batch(weight, block_size, m.setting("cayley_neumann"), m.setting("terms"), rows, cols)
    rank = in_features // block_size if m.setting("block_share") else m.setting("blocks")
    if orth_rotate.shape[0] == 1:
        blocks = [orth_rotate[0, ...] for _ in range(rank)]
    else:
        blocks = [orth_rotate[i, ...] for i in range(rank)]
    return torch.block_diag(*blocks)


METHOD = OFT()
