"""Turning planned tensors into bytes: computed on a few threads, written in order, memory bounded.

The merge is I/O-bound with a little arithmetic per byte. Three things run at once: compute
workers merge groups of rows (a LoRA delta is computed block by block so its fp32 values stay in
the CPU cache), the writer thread writes finished groups in file order, and untouched tensors are
copied file to file by the kernel (``copy_file_range``) without being decoded. Memory is bounded
by the bytes allowed in flight between computing and writing.

Exactness: a LoRA delta computed in blocks equals PEFT's whole product only where the BLAS computes
each element the same way for a block as for the whole matrix. For each tensor shape, the first
time it is seen, the blocked delta (as the workers compute it) is compared bit for bit with the
whole product computed as PEFT does (main thread, the process's thread count); a shape that does
not match is computed whole. Everything that is not a plain LoRA on a 2-D weight (DoRA, conv,
embeddings, replacements, the other PEFT methods) is computed whole on the main thread, as PEFT
computes it.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from loraship.engine import quantized
from loraship.engine.plan import LoraBiasStep, LoraStep, MethodStep, ReplaceStep, ScalesStep, TensorPlan, TokenRowsStep
from loraship.engine.safetensors_io import TensorInfo, TensorReader, torch_dtype
from loraship.engine.writer import Chunk, DataChunk
from loraship.methods import lora as lora_math
from loraship.methods.base import method_of

#: Rows are read, merged and written in groups of about this many bytes.
GROUP_BYTES = 16 << 20


class BufferPool:
    """Read buffers recycled between compute workers and the writer (no page faults per group)."""

    def __init__(self) -> None:
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()

    def get(self, nbytes: int) -> torch.Tensor:
        with self._lock:
            for i, buf in enumerate(self._free):
                if buf.numel() >= nbytes:
                    return self._free.pop(i)
        return torch.empty(nbytes, dtype=torch.uint8)

    def put(self, buf: torch.Tensor) -> None:
        with self._lock:
            self._free.append(buf)


def default_workers() -> int:
    """Compute threads: one per core available to this process (at most 8; writing is the limit)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 2
    return max(1, min(8, cores))


def _one_torch_thread() -> None:
    torch.set_num_threads(1)


class TensorStreamer:
    """Produces each planned tensor's output as work for the writer.

    Args:
        reader: Reads base and adapter tensors (its files are opened before workers use it).
        workers: Compute threads for blocked work (default: one per core, at most 8).
    """

    def __init__(self, reader: TensorReader, *, workers: int | None = None) -> None:
        workers = workers or default_workers()
        self.reader = reader
        self.buffers = BufferPool()
        self._pool = ThreadPoolExecutor(workers, initializer=_one_torch_thread, thread_name_prefix="loraship-compute")
        self._local = threading.local()
        self._blocks_ok: dict[tuple[object, ...], bool] = {}
        self._factors = FactorCache()
        self._scales: dict[str, torch.Tensor] = {}  # requantized weights' new scales, until written

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> TensorStreamer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def work(self, t: TensorPlan) -> Iterator[tuple[Future[list[Chunk]] | list[Chunk], int]]:
        """The tensor's computed output, in order, as (work, bytes) pairs; work runs on the pool when it can.

        Tensors copied as they are (``t.copies_bytes``) are the caller's: they need no torch.
        """
        source = t.source
        if source is not None and len(source.shape) == 2 and source.shape[0] > 1 and _blockable(t, source):
            bounds = lora_math.block_bounds(source.shape[0], source.shape[1] * 4)
            if t.scale is not None:  # FP8: groups of whole scale blocks, dequantized on the workers
                bounds = _aligned(bounds, source.shape[0] // t.scale.shape[0])
            step = t.steps[0] if len(t.steps) == 1 else None
            if not t.steps:  # a dtype change only: elementwise, any blocks will do
                yield from self._groups(t, source, bounds)
                return
            plain = isinstance(step, LoraStep) and step.part is None and step.piece is None and not step.dora
            if isinstance(step, LoraStep) and plain and step.layout in ("linear", "conv1d"):
                blocked = self._lora_work(t, source, step, bounds)
                if blocked is not None:
                    yield from blocked
                    return
        yield [DataChunk(compute_tensor(t, self.reader, self._factors, self._scales))], t.nbytes

    def _lora_work(
        self, t: TensorPlan, source: TensorInfo, step: LoraStep, bounds: list[tuple[int, int]]
    ) -> Iterator[tuple[Future[list[Chunk]], int]] | None:
        m = step.module
        fifo = step.layout == "conv1d"
        if len(bounds) == 1:
            return None
        a32, b32 = self.reader.read(m.a).float(), self.reader.read(m.b).float()
        key = (source.shape, a32.shape, fifo, tuple(bounds))
        if key not in self._blocks_ok:
            whole = lora_math.linear_delta(a32, b32, m.scale, fan_in_fan_out=fifo)
            check = functools.partial(lora_math.blocks_match, whole, a32, b32, m.scale, bounds, fan_in_fan_out=fifo)
            self._blocks_ok[key] = self._pool.submit(check).result()  # as the workers compute blocks
        if not self._blocks_ok[key]:
            return None
        return self._groups(t, source, bounds, lora=(a32, b32, m.scale, fifo))

    def _groups(
        self,
        t: TensorPlan,
        source: TensorInfo,
        bounds: list[tuple[int, int]],
        lora: tuple[torch.Tensor, torch.Tensor, float, bool] | None = None,
    ) -> Iterator[tuple[Future[list[Chunk]], int]]:
        row_out = t.nbytes // source.shape[0]
        group: list[tuple[int, int]] = []
        for block in [*bounds, None]:
            if block is not None and (not group or (block[1] - group[0][0]) * row_out <= GROUP_BYTES):
                group.append(block)
                continue
            if group:
                nbytes = (group[-1][1] - group[0][0]) * row_out
                yield self._pool.submit(self._compute_group, t, source, group, lora), nbytes
            group = [block] if block is not None else []

    def _compute_group(
        self,
        t: TensorPlan,
        source: TensorInfo,
        blocks: list[tuple[int, int]],
        lora: tuple[torch.Tensor, torch.Tensor, float, bool] | None,
    ) -> list[Chunk]:
        first, last = blocks[0][0], blocks[-1][1]
        buf = self.buffers.get((last - first) * (source.nbytes // source.shape[0]))
        release: Callable[[], None] | None = functools.partial(self.buffers.put, buf)
        rows = self.reader.read_rows(source, first, last, into=buf)
        dtype = torch_dtype(t.dtype)
        if t.scale is not None:  # whole blocks of an FP8 weight: each value times its block's scale
            block_rows = source.shape[0] // t.scale.shape[0]
            scales = self.reader.read_rows(t.scale, first // block_rows, last // block_rows)
            out = quantized.dequantize_fp8(rows, scales, dtype)
            self.buffers.put(buf)
            release = None
        else:
            out = rows if rows.dtype == dtype else rows.to(dtype)
        if lora is not None:
            a32, b32, scale, fifo = lora
            scratch = self._scratch(max(stop - start for start, stop in blocks) * source.shape[1])
            for start, stop in blocks:
                delta = lora_math.delta_rows(a32, b32, scale, start, stop, fan_in_fan_out=fifo, out=scratch)
                lora_math.merge_add(out[start - first : stop - first], delta)
        return [DataChunk(out, release)]

    def _scratch(self, numel: int) -> torch.Tensor:
        scratch: torch.Tensor | None = getattr(self._local, "scratch", None)
        if scratch is None or scratch.numel() < numel:
            scratch = torch.empty(numel, dtype=torch.float32)
            self._local.scratch = scratch
        return scratch


def _blockable(t: TensorPlan, source: TensorInfo) -> bool:
    """Whether the tensor can be computed in groups of rows: a plain tensor, or a 2-D block-scaled FP8
    weight written in 16 bits (not MXFP4, not requantized: those are computed whole)."""
    if t.scale is None:
        return True
    return (
        t.requantize is None and source.dtype in quantized.FP8_CODES and len(t.scale.shape) == 2
        and source.shape[0] % t.scale.shape[0] == 0
    )  # fmt: skip


def _aligned(bounds: list[tuple[int, int]], block_rows: int) -> list[tuple[int, int]]:
    """``bounds`` moved to multiples of ``block_rows`` (blocks that shrink to nothing merge)."""
    starts = sorted({(start // block_rows) * block_rows for start, _ in bounds})
    return list(zip(starts, [*starts[1:], bounds[-1][1]], strict=True))


class FactorCache:
    """The last few LoRA factors read, by tensor: the per-expert tensors of one fused parameter
    (hundreds in a row, alternating between two or three LoRAs) share them."""

    def __init__(self, size: int = 4) -> None:
        self.size = size
        self._items: dict[tuple[str, str], torch.Tensor] = {}
        self._lock = threading.Lock()

    def read(self, reader: TensorReader, info: TensorInfo) -> torch.Tensor:
        key = (str(info.file), info.name)
        with self._lock:
            found = self._items.pop(key, None)
            if found is None:
                found = reader.read(info)
            self._items[key] = found  # most recent last
            while len(self._items) > self.size:
                self._items.pop(next(iter(self._items)))
            return found


def compute_tensor(
    t: TensorPlan,
    reader: TensorReader,
    factors: FactorCache | None = None,
    scales: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The merged value of one planned tensor, whole, contiguous, in its output dtype.

    ``scales``: new block scales of requantized weights, kept from the weight to the scales that
    follow it in the plan.
    """
    if any(isinstance(step, ScalesStep) for step in t.steps):
        found = (scales or {}).pop(t.name, None)
        if found is None:
            raise RuntimeError(f"the scales {t.name} were planned before their weight")
        return found
    dtype = torch_dtype(t.requantize.via if t.requantize else t.dtype)
    value: torch.Tensor | None = None
    if t.source is not None and t.scale is not None:  # a quantized base tensor, dequantized first
        dequantize = quantized.dequantize_mxfp4 if t.source.dtype == "U8" else quantized.dequantize_fp8
        value = dequantize(reader.read(t.source), reader.read(t.scale), dtype)
    elif t.source is not None:
        value = reader.read(t.source)
        if value.dtype != dtype:
            value = value.to(dtype)
    for step in t.steps:
        if isinstance(step, ReplaceStep):
            value = reader.read(step.tensor).to(dtype)
        elif isinstance(step, LoraStep):
            assert value is not None
            value = apply_lora(value, step, reader, factors)
        elif isinstance(step, MethodStep):
            assert value is not None
            value = apply_method(value, step, reader)
        elif isinstance(step, LoraBiasStep):
            assert value is not None and step.module.bias is not None
            value = lora_math.merge_lora_bias(value, reader.read(step.module.bias), step.module.scale)
        elif isinstance(step, TokenRowsStep):
            assert value is not None
            value = lora_math.replace_rows(value, step.update.indices, reader.read(step.update.tensor))
    assert value is not None
    if t.requantize is not None:
        value, new_scales = quantized.quantize_fp8(value, t.requantize)
        if scales is not None:
            scales[t.requantize.scales] = new_scales
    return value.contiguous()


def apply_method(weight: torch.Tensor, step: MethodStep, reader: TensorReader) -> torch.Tensor:
    """``weight`` with a module of another PEFT method applied (:mod:`loraship.methods`), as PEFT rounds it."""
    method = method_of(step.module.method)
    assert method is not None
    tensors = {}
    for role, info in step.module.tensors:
        assert isinstance(info, TensorInfo)  # the adapter's headers, as the engine reads them
        tensors[role] = reader.read(info)
    return method.merge(step.module, step.param, weight, tensors, step.fan_in_fan_out)


def apply_lora(
    weight: torch.Tensor, step: LoraStep, reader: TensorReader, factors: FactorCache | None = None
) -> torch.Tensor:
    """``weight`` with the step's LoRA (or DoRA) merged in, rounded as PEFT rounds."""
    m = step.module
    if step.part is not None and factors is not None:
        a, b = factors.read(reader, m.a), factors.read(reader, m.b)
    else:
        a, b = reader.read(m.a), reader.read(m.b)
    magnitude = reader.read(m.magnitude) if m.magnitude is not None else None
    if step.piece is not None:  # transformers cuts or joins this tensor on load: the rows the LoRA covers
        piece, delta = step.piece, lora_math.linear_delta(a, b, m.scale)
        if piece.order is not None:  # rows transformers permutes on load (rotary): back in stored order
            delta = delta.index_select(0, torch.tensor(piece.order))
        if piece.transposed:  # stored (in, out)
            delta = delta.T
        if piece.into:
            lora_math.merge_add(weight.narrow(piece.dim, piece.start, piece.length), delta)
            return weight
        return lora_math.merge_add(weight, delta.narrow(piece.dim, piece.start, piece.length))
    if step.layout in ("linear", "conv1d"):
        fifo = step.layout == "conv1d"
        delta = lora_math.linear_delta(a, b, m.scale, fan_in_fan_out=fifo)
        if magnitude is not None:
            return lora_math.merge_dora_linear(weight, delta, magnitude, fan_in_fan_out=fifo)
        return lora_math.merge_add(weight, delta)
    if step.layout == "conv":
        delta = lora_math.conv_delta(a, b, m.scale, weight.shape)
        if magnitude is not None:
            return lora_math.merge_dora_conv(weight, delta, magnitude)
        return lora_math.merge_add(weight, delta)
    if step.layout == "parameter":  # a raw 2-D parameter: PEFT rounds the delta first
        return lora_math.merge_add_rounded(weight, lora_math.linear_delta(a, b, m.scale))
    if step.layout == "embedding":
        delta = lora_math.embedding_delta(a, b, m.scale)
        if magnitude is not None:
            return lora_math.merge_dora_embedding(weight, delta, magnitude)
        return lora_math.merge_add_rounded(weight, delta)
    assert m.experts is not None
    transposed = step.layout == "experts_transposed"
    if step.part is not None:  # one expert's part of a fused parameter: that expert's slice only
        p = step.part
        delta = lora_math.expert_slice_delta(a, b, m.scale, m.experts, p.expert, transposed=transposed)
        return lora_math.merge_add_rounded(weight, delta.narrow(p.dim, p.start, p.length))
    delta = lora_math.expert_delta(a, b, m.scale, m.experts, transposed=transposed)
    return lora_math.merge_add_rounded(weight, delta)
