"""The weight-level check: every tensor the merged folder holds, against base + adapter, by streaming.

Every tensor the adapter changes is computed again from base + adapter (the same plan, the same
math, a second pass) and compared bit for bit with the merged file; every other tensor must be
byte-identical to the base's; names, shapes and dtypes must match; no NaN/Inf; and a tensor the
adapter changes must differ from the base (a merge that changed nothing is the most common silent
failure). Any model size: one tensor in memory at a time.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraship.engine.merge import PreparedMerge
from loraship.engine.plan import LoraBiasStep, LoraStep, MethodStep, ReplaceStep, TensorPlan, TokenRowsStep
from loraship.engine.safetensors_io import (
    CODE_NAMES,
    FLOAT_CODES,
    Checkpoint,
    TensorInfo,
    TensorReader,
    read_checkpoint,
    torch_dtype,
    weight_files,
)
from loraship.errors import InputError, LorashipError, first_line

if TYPE_CHECKING:
    from loraship.engine.stream import TensorStreamer


_COMPARE_CHUNK = 16 << 20


@dataclass(frozen=True)
class WeightReport:
    """What the weight-level comparison found."""

    tensors: int
    changed: int
    untouched: int
    exact: int
    close: int
    max_abs_diff: float
    mismatched: tuple[tuple[str, float], ...]
    untouched_mismatched: tuple[str, ...]
    missing: tuple[str, ...]
    extra: tuple[str, ...]
    wrong_layout: tuple[str, ...]
    change_missing: tuple[str, ...]
    same_as_base: int
    non_finite: tuple[str, ...]
    adapter_tensors: int
    adapter_applied: int
    adapter_ignored: int
    dtype: str | None
    #: The adapter's own tensors that hold NaN or Inf (the cause of ``non_finite`` when not empty).
    adapter_non_finite: tuple[str, ...] = ()


def load_merged(folder: Path) -> Checkpoint:
    """The merged folder's weight headers.

    Raises:
        InputError: The folder is missing or incomplete.
        CorruptFileError: A weight file is truncated or malformed.
    """
    if not folder.is_dir():
        raise InputError(
            f"The merged folder `{folder}` does not exist.",
            fix="Pass --merged the folder `loraship merge --output` wrote.",
        )
    if not (folder / "config.json").is_file():
        raise InputError(
            f"The merged folder `{folder}` is incomplete: it has no config.json.",
            fix="Merge again (`loraship merge ... --overwrite`) or download the complete folder.",
        )
    try:
        files = weight_files(folder)
    except LorashipError as e:
        raise InputError(
            f"The merged folder `{folder}` is incomplete: {e.message}",
            fix="Merge again (`loraship merge ... --overwrite`) or download the complete folder.",
        ) from e
    if files is None:
        raise InputError(
            f"The merged folder `{folder}` is incomplete: it has no model.safetensors and no "
            "model.safetensors.index.json.",
            fix="Merge again (`loraship merge ... --overwrite`) or download the complete folder.",
        )
    return read_checkpoint(folder, files)


def merged_dtype(prepared: PreparedMerge, merged: Checkpoint) -> str | None:
    """The ``--dtype`` the merged folder was written with, if not the base's own dtypes."""
    found = {
        (t.source.dtype, merged.tensors[t.name].dtype)
        for t in prepared.plan.tensors
        if t.source is not None and t.source.dtype in FLOAT_CODES and t.name in merged.tensors
    }
    targets = {dst for src, dst in found if dst != src}
    if len(targets) == 1 and all(dst in targets for _, dst in found):
        return CODE_NAMES.get(targets.pop())
    return None


def verify_weights(
    prepared: PreparedMerge,
    merged: Checkpoint,
    *,
    atol: float = 0.0,
    progress: bool = False,
    streamer: TensorStreamer | None = None,
) -> WeightReport:
    """Compare every merged tensor with its recomputation from base + adapter (streaming).

    ``progress``: a bar over the bytes checked, on stderr. ``streamer``: one kept across calls (a
    streaming run checks shard by shard; requantized scales follow their weight); a new one when None.
    """
    import torch
    from tqdm.auto import tqdm

    from loraship.engine.stream import TensorStreamer
    from loraship.engine.writer import DataChunk

    plan = prepared.plan
    planned = {t.name: t for t in plan.tensors}
    missing = tuple(n for n in planned if n not in merged.tensors)
    extra = tuple(n for n in merged.tensors if n not in planned)
    wrong_layout = tuple(
        f"{n} ({merged.tensors[n].dtype} {list(merged.tensors[n].shape)}, expected {t.dtype} {list(t.shape)})"
        for n, t in planned.items()
        if n in merged.tensors and _layout_differs(t, merged)
    )
    comparable = [t for t in plan.tensors if t.name in merged.tensors and not _layout_differs(t, merged)]
    exact = close = same_as_base = 0
    max_diff = 0.0
    mismatched: list[tuple[str, float]] = []
    untouched_bad: list[str] = []
    change_missing: list[str] = []
    non_finite: list[str] = []
    adapter_non_finite: list[str] = []
    bar = tqdm(total=sum(merged.tensors[t.name].nbytes for t in comparable), unit="B", unit_scale=True,
               desc="Checking weights", disable=not progress, leave=False)  # fmt: skip
    with contextlib.ExitStack() as stack:
        stack.enter_context(bar)
        if streamer is None:
            streamer = stack.enter_context(TensorStreamer(stack.enter_context(TensorReader())))
        reader = streamer.reader
        for t in comparable:
            actual_info = merged.tensors[t.name]
            bar.update(actual_info.nbytes)
            if t.copies_bytes and t.source is not None:
                if not _same_bytes(reader, t.source, actual_info):
                    untouched_bad.append(t.name)
                continue
            offset = 0
            diff = 0.0
            equal = as_base = expected_is_base = True
            finite = True
            comparable_to_base = t.source is not None and t.source.shape == t.shape and t.source.dtype == t.dtype
            for work, _ in streamer.work(t):
                chunks = work.result() if not isinstance(work, list) else work
                for chunk in chunks:
                    assert isinstance(chunk, DataChunk)
                    expected = chunk.tensor.reshape(-1)
                    length = expected.numel() * expected.element_size()
                    actual = _read_flat(reader, actual_info, offset, length, expected.dtype)
                    if not torch.equal(_bits(actual), _bits(expected)):
                        equal = False
                        delta = (actual.double() - expected.double()).abs().nan_to_num(nan=math.inf)
                        diff = max(diff, float(delta.max()))
                    if actual.is_floating_point() and not bool(torch.isfinite(actual.float()).all()):
                        finite = False
                    if comparable_to_base and t.source is not None:
                        base_part = _read_flat(reader, t.source, offset, length, expected.dtype)
                        as_base &= bool(torch.equal(_bits(actual), _bits(base_part)))
                        expected_is_base &= bool(torch.equal(_bits(expected), _bits(base_part)))
                    if chunk.release is not None:
                        chunk.release()
                    offset += length
            max_diff = max(max_diff, diff)
            if equal:
                exact += 1
            elif diff <= atol:
                close += 1
            else:
                mismatched.append((t.name, diff))
            if not finite:
                non_finite.append(t.name)
                adapter_non_finite.extend(n for n in _non_finite_inputs(reader, t) if n not in adapter_non_finite)
            if comparable_to_base and as_base:
                same_as_base += 1
                if not expected_is_base:
                    change_missing.append(t.name)
    ignored = sum(1 for v in plan.accounting.values() if v.startswith("(ignored"))
    changed = [t for t in plan.tensors if not t.copies_bytes]
    return WeightReport(
        tensors=len(plan.tensors),
        changed=len(changed),
        untouched=len(plan.tensors) - len(changed),
        exact=exact,
        close=close,
        max_abs_diff=max_diff,
        mismatched=tuple(mismatched),
        untouched_mismatched=tuple(untouched_bad),
        missing=missing,
        extra=extra,
        wrong_layout=wrong_layout,
        change_missing=tuple(change_missing),
        same_as_base=same_as_base,
        non_finite=tuple(non_finite),
        adapter_tensors=len(plan.accounting),
        adapter_applied=len(plan.accounting) - ignored,
        adapter_ignored=ignored,
        dtype=None,
        adapter_non_finite=tuple(adapter_non_finite),
    )


def combine_weights(parts: Sequence[WeightReport], prepared: PreparedMerge) -> WeightReport:
    """The reports of a model checked shard by shard (each against its own tensors of the plan) as one."""
    plan = prepared.plan
    ignored = sum(1 for v in plan.accounting.values() if v.startswith("(ignored"))
    changed = sum(1 for t in plan.tensors if not t.copies_bytes)

    def joined(field_name: str) -> tuple[Any, ...]:
        return tuple(item for p in parts for item in getattr(p, field_name))

    return WeightReport(
        tensors=len(plan.tensors), changed=changed, untouched=len(plan.tensors) - changed,
        exact=sum(p.exact for p in parts), close=sum(p.close for p in parts),
        max_abs_diff=max((p.max_abs_diff for p in parts), default=0.0), mismatched=joined("mismatched"),
        untouched_mismatched=joined("untouched_mismatched"), missing=joined("missing"), extra=joined("extra"),
        wrong_layout=joined("wrong_layout"), change_missing=joined("change_missing"),
        same_as_base=sum(p.same_as_base for p in parts), non_finite=joined("non_finite"),
        adapter_tensors=len(plan.accounting), adapter_applied=len(plan.accounting) - ignored, adapter_ignored=ignored,
        dtype=None, adapter_non_finite=tuple(dict.fromkeys(joined("adapter_non_finite"))),
    )  # fmt: skip


def _layout_differs(t: TensorPlan, merged: Checkpoint) -> bool:
    found = merged.tensors[t.name]
    return found.shape != t.shape or found.dtype != t.dtype


def _same_bytes(reader: TensorReader, a: TensorInfo, b: TensorInfo) -> bool:
    if a.nbytes != b.nbytes:
        return False
    for start in range(0, a.nbytes, _COMPARE_CHUNK):
        length = min(_COMPARE_CHUNK, a.nbytes - start)
        if reader.read_bytes(a, start, length) != reader.read_bytes(b, start, length):
            return False
    return True


def _non_finite_inputs(reader: TensorReader, t: TensorPlan) -> list[str]:
    """The adapter tensors applied to ``t`` that hold NaN or Inf (a merged tensor that does came from them)."""
    import torch

    infos: list[TensorInfo] = []
    for step in t.steps:
        if isinstance(step, LoraStep):
            infos += [step.module.a, step.module.b] + ([step.module.magnitude] if step.module.magnitude else [])
        elif isinstance(step, MethodStep):
            infos += [info for _, info in step.module.tensors if isinstance(info, TensorInfo)]
        elif isinstance(step, LoraBiasStep) and step.module.bias is not None:
            infos.append(step.module.bias)
        elif isinstance(step, ReplaceStep):
            infos.append(step.tensor)
        elif isinstance(step, TokenRowsStep):
            infos.append(step.update.tensor)
    found = []
    for info in infos:
        values = _read_flat(reader, info, 0, info.nbytes, torch_dtype(info.dtype))
        if values.is_floating_point() and not bool(torch.isfinite(values.float()).all()):
            found.append(info.name)
    return found


def _read_flat(reader: TensorReader, info: TensorInfo, start: int, length: int, dtype: Any) -> Any:
    import torch

    data = reader.read_bytes(info, start, length)
    return torch.frombuffer(data, dtype=torch.uint8).view(dtype) if length else torch.empty(0, dtype=dtype)


def _bits(t: Any) -> Any:
    import torch

    size = t.element_size()
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[size]) if t.numel() else t


def library_problems(path: Path, tensors: Mapping[str, TensorInfo]) -> list[str]:
    """What the safetensors library reads differently from ``tensors`` in one file."""
    from safetensors import safe_open

    problems: list[str] = []
    try:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                shape = tuple(f.get_slice(name).get_shape())
                if name not in tensors or tensors[name].shape != shape:
                    problems.append(f"{path.name}: `{name}` reads as {list(shape)}")
    except Exception as e:  # the library's own error types differ by version
        problems.append(f"{path.name}: {first_line(e)}")
    return problems
