"""Pure tensor functions: the delta and the merged weight for each layer kind.

Each function mirrors the operations PEFT 0.21's ``merge_and_unload`` performs on CPU, op for op
(fp32 adapter weights, scale applied after the matmul, PEFT's rounding points), so the merged
tensors are bit-identical to PEFT's. ``tests/methods/test_lora_math.py`` and the merge tests check that
against PEFT itself. No I/O, no logging: tensors in, tensors out. Functions named ``merge_*``
may modify the base tensor they are given (callers pass a tensor they own).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def _transpose(t: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    return t.T if fan_in_fan_out else t


def linear_delta(a: torch.Tensor, b: torch.Tensor, scale: float, *, fan_in_fan_out: bool = False) -> torch.Tensor:
    """``(B @ A)`` in fp32, transposed for Conv1D-style (in, out) weights, times ``scale``."""
    return _transpose(b.float() @ a.float(), fan_in_fan_out) * scale


def delta_rows(
    a32: torch.Tensor,
    b32: torch.Tensor,
    scale: float,
    start: int,
    stop: int,
    *,
    fan_in_fan_out: bool = False,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rows ``start:stop`` of :func:`linear_delta` (in the weight's layout), from fp32 A and B.

    For (out, in) weights these are ``B[start:stop] @ A``; for Conv1D (in, out) weights, columns of
    ``B @ A`` transposed. Equal to slicing the whole delta only where the BLAS computes each
    element the same way for a block as for the whole product: callers check that
    (:func:`blocks_match`) before relying on it. ``out`` is an fp32 scratch buffer.
    """
    if fan_in_fan_out:
        cols = a32[:, start:stop].contiguous()
        buf = (
            out.view(-1)[: b32.shape[0] * (stop - start)].view(b32.shape[0], stop - start) if out is not None else None
        )
        product = torch.mm(b32, cols, out=buf) if buf is not None else b32 @ cols
        return product.mul_(scale).T
    rows = stop - start
    buf = out.view(-1)[: rows * a32.shape[1]].view(rows, a32.shape[1]) if out is not None else None
    product = torch.mm(b32[start:stop], a32, out=buf) if buf is not None else b32[start:stop] @ a32
    return product.mul_(scale)


def block_bounds(
    rows: int, row_bytes: int, *, target_bytes: int = 1 << 20, min_rows: int = 64
) -> list[tuple[int, int]]:
    """Split ``rows`` into blocks of about ``target_bytes`` of fp32, none smaller than ``min_rows``.

    A short tail joins the block before it: tiny blocks make BLAS pick other kernels.
    """
    step = max(min_rows, target_bytes // max(1, row_bytes))
    starts = list(range(0, rows, step))
    if len(starts) > 1 and rows - starts[-1] < min_rows:
        starts.pop()
    return list(zip(starts, [*starts[1:], rows], strict=True))


def blocks_match(
    whole: torch.Tensor,
    a32: torch.Tensor,
    b32: torch.Tensor,
    scale: float,
    bounds: list[tuple[int, int]],
    *,
    fan_in_fan_out: bool,
) -> bool:
    """Whether the blocked delta is bit-identical to ``whole``, :func:`linear_delta` (PEFT's computation)."""
    for start, stop in bounds:
        part = delta_rows(a32, b32, scale, start, stop, fan_in_fan_out=fan_in_fan_out)
        if not torch.equal(part.contiguous().view(torch.int32), whole[start:stop].contiguous().view(torch.int32)):
            return False
    return True


def conv_delta(a: torch.Tensor, b: torch.Tensor, scale: float, weight_shape: Sequence[int]) -> torch.Tensor:
    """Delta of a LoRA on ``ConvNd`` (groups=1), as PEFT computes it: a convolution of A by B."""
    a32, b32 = a.float(), b.float()
    if tuple(weight_shape[2:4]) == (1, 1):
        return (b32.squeeze(3).squeeze(2) @ a32.squeeze(3).squeeze(2)).unsqueeze(2).unsqueeze(3) * scale
    conv = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[len(weight_shape)]
    return conv(a32.transpose(0, 1), b32).transpose(0, 1) * scale


def embedding_delta(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """Delta of a LoRA on ``nn.Embedding``: ``(B @ A)ᵀ · scale``, shape (vocab, dim)."""
    return (b.float() @ a.float()).T * scale


def merge_add(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``W += Δ`` in place: the sum is taken in fp32 and rounded once to W's dtype (Linear, Conv)."""
    weight += delta
    return weight


def merge_add_rounded(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``W += Δ.to(W.dtype)`` in place: Δ is rounded first, then the sum (Embedding, experts)."""
    weight += delta.to(weight.dtype)
    return weight


def merge_dora_linear(
    weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, *, fan_in_fan_out: bool = False
) -> torch.Tensor:
    """DoRA on Linear/Conv1D: ``(m / ‖W + Δ‖₂ per output row) · (W + Δ)``, rounded once.

    ``delta`` is :func:`linear_delta`'s output (same layout as ``weight``).
    """
    lora_weight = _transpose(delta, fan_in_fan_out)
    norm_input = _transpose(weight, fan_in_fan_out) + 1 * lora_weight
    weight_norm = torch.linalg.norm(norm_input, dim=1).to(norm_input.dtype)
    factor = _transpose((magnitude.float() / weight_norm).view(-1, 1), fan_in_fan_out)
    return (factor * (weight + delta)).to(weight.dtype)


def merge_dora_embedding(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """DoRA on Embedding: the norm runs over the vocabulary for each hidden column."""
    norm_input = weight.T + 1 * delta.T
    weight_norm = torch.linalg.norm(norm_input, dim=1).to(norm_input.dtype)
    factor = (magnitude.float() / weight_norm).view(1, -1)
    return (factor * (weight + delta)).to(weight.dtype)


def merge_dora_conv(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """DoRA on ConvNd: the norm runs over everything but the output channel."""
    norm_input = weight + 1 * delta
    dims = tuple(range(1, norm_input.dim()))
    weight_norm = norm_input.norm(p=2, dim=dims, keepdim=True).transpose(1, 0)
    factor = magnitude.float() / weight_norm
    view = (-1,) + (1,) * (weight.dim() - 1)
    return (factor.view(*view) * (weight + delta)).to(weight.dtype)


def merge_lora_bias(bias: torch.Tensor, lora_bias: torch.Tensor, scale: float) -> torch.Tensor:
    """``lora_bias=True``: ``b += lora_B.bias · scale`` in place, rounded once."""
    bias += lora_bias.float() * scale
    return bias


def replace_rows(weight: torch.Tensor, indices: Sequence[int], rows: torch.Tensor) -> torch.Tensor:
    """``trainable_token_indices``: rows ``indices`` of an embedding take the trained values."""
    index = torch.tensor(list(indices), dtype=torch.long)
    return weight.index_copy(0, index, rows.to(weight.dtype))


def expert_delta(a: torch.Tensor, b: torch.Tensor, scale: float, experts: int, *, transposed: bool) -> torch.Tensor:
    """Delta of a LoRA on a 3-D expert parameter (``target_parameters``), shape (E, out, in).

    A is saved as (E·r, in) and B as (out, r·E); PEFT views them as (E, r, in) and (out, r, E).
    ``transposed`` is for parameters stored as (E, in, out).
    """
    a32 = a.float().reshape(experts, -1, a.shape[-1])
    b32 = b.float().reshape(b.shape[0], -1, experts)
    pattern = "o r e, e r i -> e i o" if transposed else "o r e, e r i -> e o i"
    return torch.einsum(pattern, b32, a32) * scale


def expert_slice_delta(
    a: torch.Tensor, b: torch.Tensor, scale: float, experts: int, expert: int, *, transposed: bool
) -> torch.Tensor:
    """``expert_delta(...)[expert]``, computed for that expert alone (PEFT's einsum on a batch of one).

    For a parameter transformers fuses from per-expert tensors: the merge never holds the whole
    stack's delta. ``tests/methods/test_lora_math.py`` checks it is bit-identical to the whole einsum.
    """
    a32 = a.reshape(experts, -1, a.shape[-1])[expert : expert + 1].float()  # one expert's rows, not all of A
    b32 = b.reshape(b.shape[0], -1, experts)[:, :, expert : expert + 1].float()
    pattern = "o r e, e r i -> e i o" if transposed else "o r e, e r i -> e o i"
    return (torch.einsum(pattern, b32, a32) * scale)[0]
