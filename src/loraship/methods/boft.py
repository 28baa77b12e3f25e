"""BOFT (``peft_type: BOFT``): ``W' = (B @ Wᵀ)ᵀ * s``, B a product of butterfly-permuted block rotations of the
layer's input side and ``s`` a per-output scale.

PEFT 0.21: ``tuners/boft/layer.py`` (``BOFTLayer.update_layer``, ``block_butterfly_perm``, ``perm2mat``,
``cayley_batch``, ``Linear.get_delta_weight``, ``Linear.merge``, ``Conv2d.update_layer``, ``Conv2d.merge``),
``tuners/boft/model.py`` (``_create_new_module``: Linear and Conv2d only) and ``tuners/boft/config.py``
(``BOFTConfig``: exactly one of ``boft_block_size`` and ``boft_block_num`` is non-zero).

``boft_R`` is ``(m + 1, N, b, b)`` (``m + 1`` butterfly factors, ``N`` blocks of ``b``, ``N * b`` the layer's
input features: ``in`` for a Linear, ``in * k * k`` for a Conv2d with a ``k x k`` kernel), ``boft_s`` is
``(out, 1)`` on a Linear and ``(1, out)`` on a Conv2d. PEFT builds the butterfly factors only where its CUDA
extension ``fbd_cuda`` loads: elsewhere (every CPU) ``update_layer`` sets ``boft_n_butterfly_factor`` to 1
whatever the config says, so an adapter trained there has one factor, and one trained with the extension
and ``boft_n_butterfly_factor`` = m + 1 > 1 has m + 1 (which PEFT without the extension cannot load). The
merge takes the number of factors from ``boft_R``: one factor is PEFT's CPU path op for op; more factors are
PEFT's extension path, whose kernel only lays the blocks out on a diagonal (``torch.block_diag`` per factor
here, the same values).

``get_delta_weight``: per block ``S = 0.5 * (R - Rᵀ)``, ``Q = solve(I + S, I - S, left=False)`` (fp32; PEFT
upcasts a half-precision adapter on load); per factor ``BD_i = block_diag(Q_i1 … Q_iN)``; the non-persistent
permutations ``P_i = perm2mat(block_butterfly_perm(in, N / 2^i, b / 2, m))`` (the identity when m = 0) are rebuilt
here as PEFT rebuilds them; ``M_i = P_i @ (BD_i @ P_iᵀ)`` (two ``bmm``) and ``B = M_m @ … @ M_1 @ M_0``. The merge
is ``((mm(B, Wᵀ.to(fp32)))ᵀ * s).contiguous().to(W.dtype)`` (a convolution's weight viewed ``(out, in * k * k)``
and ``s`` transposed to ``(out, 1)`` first): one fp32 product, rounded once. Biases are left alone (PEFT's
forward scales the output before the bias). ``boft_dropout`` is training only.

Every merge is checked against PEFT's own layers built on the meta device (:mod:`loraship.engine.oracle`), where
PEFT's ``BOFTLayer.block_butterfly_perm`` and ``perm2mat`` cannot run (they index with meta tensors): that check
runs the first on the CPU and takes the permutation matrices' shapes (``_meta_safe_layers``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraship.errors import AdapterError
from loraship.methods.base import Method, MethodModule, Saved, Unsupported, _is_number, adapter_float, incomplete, span

if TYPE_CHECKING:
    import torch


def _is_whole(v: Any, least: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= least


#: adapter_config.json fields BOFT reads, with what PEFT's BOFTConfig expects.
_FIELDS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "boft_block_size": ("a whole number from 0 (0: set by boft_block_num)", lambda v: _is_whole(v, 0)),
    "boft_block_num": ("a whole number from 0 (0: set by boft_block_size)", lambda v: _is_whole(v, 0)),
    "boft_n_butterfly_factor": ("a whole number from 1", lambda v: _is_whole(v, 1)),
    "boft_dropout": ("a number", _is_number),
    "fan_in_fan_out": ("true or false", lambda v: isinstance(v, bool)),
    "init_weights": ("true or false", lambda v: isinstance(v, bool)),
}


class BOFT(Method):
    peft_type = "BOFT"
    name = "BOFT"
    kind = "multiplicative"
    roles = ("boft_R", "boft_s")
    fields = _FIELDS

    def module(self, name: str, tensors: Mapping[str, Saved], config: Mapping[str, Any], folder: Path) -> MethodModule:
        if set(tensors) != {"boft_R", "boft_s"}:
            raise incomplete(folder, name, set(tensors), self.name)
        block_size, block_num = int(config.get("boft_block_size", 4)), int(config.get("boft_block_num", 0))
        if (block_size != 0) == (block_num != 0):
            raise AdapterError(
                f"`{folder}` sets boft_block_size = {block_size} and boft_block_num = {block_num}, but PEFT's "
                "BOFTConfig needs exactly one of them non-zero (boft_block_size x boft_block_num = the layer's "
                "input features).",
                fix="Correct the field that PEFT did not write, or save the adapter again with PEFT.",
            )
        shape = tuple(tensors["boft_R"].shape)
        if len(shape) != 4 or shape[2] != shape[3] or min(shape) < 1:
            raise AdapterError(
                f"`{folder}`: the BOFT module `{name}` has boft_R {list(shape)}, but PEFT makes it (butterfly "
                "factors, blocks, b, b) and cannot load it.",
                fix="The adapter file does not match its adapter_config.json: save the adapter again with PEFT.",
            )
        factors, configured = shape[0], int(config.get("boft_n_butterfly_factor", 1))
        if factors != 1 and factors != configured:
            raise AdapterError(
                f"`{folder}`: the BOFT module `{name}` has boft_R {list(shape)} with {factors} butterfly factors, "
                f"but its config sets boft_n_butterfly_factor = {configured}; PEFT makes {configured} with its CUDA "
                "extension and 1 without it, and cannot load the adapter either way.",
                fix="The adapter file does not match its adapter_config.json: save the adapter again with PEFT.",
            )
        settings = (
            ("config_block_size", block_size),
            ("config_block_num", block_num),
            ("factors", factors),
            ("blocks", shape[1]),
            ("block_size", shape[2]),
        )
        return MethodModule(self.peft_type, name, tuple(tensors.items()), settings)

    def shape_problem(self, m: MethodModule, param: str, shape: tuple[int, ...], fan_in_fan_out: bool) -> str | None:
        if fan_in_fan_out:
            return Unsupported(
                "BOFT on a Conv1D layer (weights stored (in, out)) is not merged by loraship (PEFT's BOFT adapts "
                "only Linear and Conv2d layers)"
            )
        if len(shape) == 2:
            in_features, what, scale = shape[1], "input features", (shape[0], 1)
        elif len(shape) == 4:
            if shape[2] != shape[3]:
                return Unsupported(
                    f"BOFT on a convolution with a non-square {shape[2]}x{shape[3]} kernel is not merged by "
                    "loraship (PEFT's BOFT sizes its rotation for a square kernel)"
                )
            in_features, what, scale = shape[1] * shape[2] * shape[3], "in_channels x kernel x kernel", (1, shape[0])
        else:
            return Unsupported(
                f"BOFT on a {len(shape)}-D weight is not merged (PEFT's BOFT adapts only Linear and Conv2d layers)"
            )
        grouped = " (BOFT does not support grouped convolutions)" if len(shape) == 4 else ""
        layout = _layout(
            in_features, m.setting("config_block_size"), m.setting("config_block_num"), m.setting("factors")
        )
        saved = m.shape("boft_R")
        if isinstance(layout, str):
            return f"the adapter's boft_R {list(saved)} cannot be built for {what} = {in_features}: {layout}{grouped}"
        expected = (m.setting("factors"), *layout, layout[1])
        if saved != expected:
            return (
                f"the adapter's boft_R {list(saved)} is not the {list(expected)} PEFT makes for {what} = "
                f"{in_features}{grouped}"
            )
        if m.shape("boft_s") != scale:
            return f"the adapter's boft_s {list(m.shape('boft_s'))} is not the {list(scale)} PEFT makes for it"
        return None

    def merge(
        self, m: MethodModule, param: str, weight: torch.Tensor, tensors: Mapping[str, torch.Tensor],
        fan_in_fan_out: bool,
    ) -> torch.Tensor:  # fmt: skip
        import torch

        boft_R, boft_s = adapter_float(tensors["boft_R"]), adapter_float(tensors["boft_s"])
        conv = weight.dim() == 4
        orig_weight = weight.clone()
        orig_dtype = orig_weight.dtype
        butterfly_oft_mat = _butterfly(boft_R)
        if conv:
            out, in_, k = weight.shape[0], weight.shape[1], weight.shape[2]
            boft_s = boft_s.transpose(0, 1)
            orig_weight = orig_weight.view(out, in_ * k * k)
        orig_weight = torch.transpose(orig_weight, 0, 1)
        orig_weight = torch.mm(butterfly_oft_mat, orig_weight.to(butterfly_oft_mat.dtype))
        orig_weight = torch.transpose(orig_weight, 0, 1)
        orig_weight = orig_weight * boft_s
        if conv:
            orig_weight = orig_weight.view(out, in_, k, k)
        return orig_weight.contiguous().to(orig_dtype)

    def describe(self, m: MethodModule) -> str:
        factors = m.setting("factors")
        return (
            f"BOFT {m.setting('blocks')} blocks of {m.setting('block_size')}, {factors} butterfly "
            f"factor{'s' if factors > 1 else ''}"
        )

    def summary(self, modules: tuple[MethodModule, ...]) -> str:
        return (
            f"block size = {span([m.setting('block_size') for m in modules])}, butterfly factors = "
            f"{span([m.setting('factors') for m in modules])}"
        )


def _layout(in_features: int, block_size: int, block_num: int, factors: int) -> tuple[int, int] | str:
    """PEFT's ``update_layer``: ``(N, b)`` for a layer of ``in_features``, or why PEFT refuses to build it."""
    m = factors - 1
    if block_size == 0:
        if in_features % block_num != 0:
            return f"PEFT needs them divisible by boft_block_num = {block_num}"
        if m != 0 and (m > (block_num.bit_length() - 1) or block_num % (2**m) != 0):
            return f"PEFT needs boft_block_num = {block_num} to be a multiple of 2^{m} for {factors} butterfly factors"
        block_size = in_features // block_num
    else:
        if in_features % block_size != 0:
            return f"PEFT needs them divisible by boft_block_size = {block_size}"
        if m != 0 and in_features % (block_size * 2**m) != 0:
            return (
                f"PEFT needs them to be a multiple of boft_block_size x 2^{m} = {block_size * 2**m} for {factors} "
                "butterfly factors"
            )
        block_num = in_features // block_size
    if m != 0 and (block_num % 2 != 0 or block_size % 2 != 0):
        return f"PEFT needs an even number of blocks of even size for {factors} butterfly factors"
    return block_num, block_size


def _block_butterfly_perm(n: int, b: int, r: int, n_butterfly_factor: int) -> torch.Tensor:
    """PEFT's ``BOFTLayer.block_butterfly_perm``, op for op."""
    import torch

    if n_butterfly_factor == 0:
        return torch.arange(n)
    block_size = int(n // b)
    indices = torch.arange(n)

    def sort_block(b: int, r: int) -> torch.Tensor:
        step = b / r
        initial_order = torch.arange(b)
        sorted_order = torch.empty(b, dtype=torch.long)
        evens = torch.arange(0, step, 2)
        odds = torch.arange(1, step, 2)
        sorted_seq = torch.cat((evens, odds), dim=0)
        for i, pos in enumerate(sorted_seq):
            sorted_order[int(i * r) : int(i * r + r)] = initial_order[int(pos * r) : int(pos * r + r)]
        return sorted_order

    sorted_order = sort_block(block_size, r)
    for i in range(0, n, block_size):
        block_end = i + block_size
        tmp_indices = indices[i:block_end]
        indices[i:block_end] = tmp_indices[sorted_order]
    return indices


@lru_cache(maxsize=4)
def _permutations(in_features: int, block_num: int, block_size: int, factors: int) -> torch.Tensor:
    """``boft_P``: the ``(factors, in, in)`` fp32 permutation matrices PEFT rebuilds on load (``perm2mat``)."""
    import torch

    m = factors - 1
    P = torch.empty((m + 1, in_features, in_features))
    for i in range(m + 1):
        perm = _block_butterfly_perm(in_features, int(block_num / (2**i)), int(block_size / 2), m)
        perm_mat = torch.zeros((in_features, in_features))
        for row, idx in enumerate(perm):
            perm_mat[row, idx] = 1
        P[i] = perm_mat
    return P


def _cayley_batch(data: torch.Tensor) -> torch.Tensor:
    """PEFT's ``BOFTLayer.cayley_batch``, op for op."""
    import torch

    b, r, c = data.shape
    skew_mat = 0.5 * (data - data.transpose(1, 2))
    id_mat = torch.eye(r, device=data.device).unsqueeze(0).expand(b, r, c)
    Q = torch.linalg.solve(id_mat + skew_mat, id_mat - skew_mat, left=False)
    return Q.to(data.dtype)


def _butterfly(boft_R: torch.Tensor) -> torch.Tensor:
    """PEFT's ``get_delta_weight``: the ``in x in`` butterfly rotation."""
    import torch

    N, D, H, _ = boft_R.shape
    orth_rotate_butterfly = _cayley_batch(boft_R.reshape(N * D, H, H)).view(N, D, H, H)
    if N == 1:  # PEFT without the CUDA extension
        block_diagonal_butterfly = torch.block_diag(*torch.unbind(orth_rotate_butterfly.squeeze(0))).unsqueeze(0)
    else:  # FastBlockDiag: each factor's blocks on the diagonal
        block_diagonal_butterfly = torch.stack([torch.block_diag(*torch.unbind(f)) for f in orth_rotate_butterfly])
    boft_P = _permutations(D * H, D, H, N).to(block_diagonal_butterfly.device, block_diagonal_butterfly.dtype)
    butterfly_oft_mat_batch = torch.bmm(block_diagonal_butterfly, boft_P.permute(0, 2, 1))
    butterfly_oft_mat_batch = torch.bmm(boft_P, butterfly_oft_mat_batch)
    butterfly_oft_mat = butterfly_oft_mat_batch[0]
    for i in range(1, butterfly_oft_mat_batch.shape[0]):
        butterfly_oft_mat = butterfly_oft_mat_batch[i] @ butterfly_oft_mat
    return butterfly_oft_mat


METHOD = BOFT()
