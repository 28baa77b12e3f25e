"""Carry out a :class:`~loraship.engine.plan.MergePlan`: stream tensors from the base into new shards.

Memory stays bounded (about one group of rows per compute thread, plus the bytes in flight to
the writer, see :mod:`loraship.engine.stream`); untouched tensors are copied file to file without being
decoded, and are queued first, while torch is still importing. The output is written into a
temporary folder beside the destination and renamed into place only when complete, so a failed
or interrupted merge never leaves a folder that looks complete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from loraship.engine import quantized
from loraship.engine.adapter import AdapterSpec, load_adapter, read_adapter_config
from loraship.engine.base_config import check_base_config
from loraship.engine.model_map import ModelMap, ModelMapError, inspect_model
from loraship.engine.oracle import OracleReport, check_plan
from loraship.engine.plan import MergePlan, ScalesStep, TensorPlan
from loraship.engine.planner import plan_merge
from loraship.engine.repo_files import CONFIG_NAME, FileChoice, check_input_folder, choose_files, copy_files
from loraship.engine.safetensors_io import (
    INDEX_NAME,
    SHARD_PATTERN,
    Checkpoint,
    OutputTensor,
    ShardWriter,
    TensorInfo,
    TensorReader,
    dtype_code,
    read_checkpoint,
    tensor_bytes,
    weight_files,
)
from loraship.engine.writer import CopyChunk, OrderedWriter, existing_ancestor
from loraship.errors import BaseModelError, OutputError, UnsupportedError, first_line
from loraship.text import human_bytes, parse_size

DEFAULT_MAX_SHARD_SIZE = "5GB"
_PARTIAL_MARK = ".loraship-partial-"


@dataclass(frozen=True)
class PreparedMerge:
    """Everything decided before writing: inputs read, plan made."""

    base_dir: Path
    adapter_dir: Path
    base: Checkpoint
    base_config: Mapping[str, Any]
    adapter: AdapterSpec
    plan: MergePlan
    files: tuple[FileChoice, ...]
    model: ModelMap | None = None
    model_problem: str | None = None
    names: OracleReport | None = None

    @property
    def notes(self) -> tuple[str, ...]:
        return self.plan.notes

    def with_dtype(self, dtype: str) -> PreparedMerge:
        """The same inputs planned for another output dtype (nothing is read or converted again)."""
        plan = _plan(self.base, self.base_config, self.adapter, self.model, self.model_problem, dtype, self.base_dir)
        return replace(self, plan=plan)

    def requantized(self) -> PreparedMerge:
        """The merge writing the base's FP8 format (``--requantize``) instead of 16 bits.

        Raises:
            InputError: The base is not block-scaled FP8.
        """
        return replace(self, plan=quantized.requantized(self.plan, self.base_config, str(self.base_dir)))


@dataclass(frozen=True)
class MergeResult:
    """What a merge wrote."""

    output: Path
    prepared: PreparedMerge
    weight_files: tuple[str, ...]
    other_files: tuple[str, ...]
    bytes_written: int
    seconds: float
    left_out: tuple[tuple[str, str], ...] = field(default_factory=tuple)


def load_base(
    folder: Path, *, allow_pickle: bool = False, scratch: Path | None = None
) -> tuple[Checkpoint, dict[str, Any]]:
    """Read a base model folder's config.json and weight headers.

    Raises:
        BaseModelError: The folder, its config or its safetensors weights are missing.
    """
    if not folder.is_dir():
        raise BaseModelError(
            f"Base model folder `{folder}` does not exist.",
            fix="Pass the folder save_pretrained() wrote (or a Hub repo id with `loraship run`).",
        )
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise BaseModelError(
            f"`{folder}` has no config.json: it is not a transformers model folder.",
            fix="Pass the folder of the full base model (config.json and model*.safetensors).",
        )
    try:
        config = json.loads(config_path.read_text())
    except (ValueError, RecursionError) as e:
        why = "nested too deeply" if isinstance(e, RecursionError) else str(e)
        raise BaseModelError(f"`{config_path}` is not valid JSON ({why}).", fix="Download the base model again.") from e
    check_base_config(config, config_path, None)
    files = weight_files(folder)
    if files is None:
        pickled = sorted(folder.glob("pytorch_model*.bin"))
        if not pickled:
            raise BaseModelError(
                f"`{folder}` has no safetensors weights (model.safetensors or model.safetensors.index.json).",
                fix="Download the model's weights, or save it with save_pretrained() (which writes safetensors).",
            )
        if not allow_pickle:
            raise BaseModelError(
                f"`{folder}` holds its weights only as pickled {pickled[0].name}. Loading a pickle can run "
                "arbitrary code, so loraship refuses it by default.",
                fix="If you trust this model, pass --allow-pickle (weights are then loaded with "
                "torch.load(weights_only=True) and converted to safetensors on the way).",
            )
        if scratch is None:
            raise ValueError("load_base(allow_pickle=True) needs a scratch folder")
        files = _convert_pickled_base(pickled, scratch)
    checkpoint = quantized.packed_view(read_checkpoint(folder, files), config)
    check_base_config(config, config_path, checkpoint.tensors)
    return checkpoint, config


def _convert_pickled_base(pickled: list[Path], scratch: Path) -> tuple[Path, ...]:
    """Convert pickled shards to safetensors one tensor at a time (torch.load with mmap)."""
    import torch

    scratch.mkdir(parents=True, exist_ok=True)
    out: list[Path] = []
    for i, path in enumerate(pickled):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise BaseModelError(
                f"`{path}` could not be loaded with torch.load(weights_only=True): {first_line(e)}",
                fix="Convert the model to safetensors where you trust it (save_pretrained()).",
            ) from e
        tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        specs = [OutputTensor(k, dtype_code(v.dtype), tuple(v.shape)) for k, v in tensors.items()]
        target = scratch / f"converted-{i:05d}.safetensors"
        writer = ShardWriter(target, specs, {"format": "pt"})
        for spec in specs:
            t = tensors[spec.name].contiguous()
            writer.begin(spec.name)
            writer.write(tensor_bytes(t))
        writer.close()
        out.append(target)
        del state, tensors
    return tuple(out)


def prepare_merge(
    base_dir: Path,
    adapter_dir: Path,
    *,
    dtype: str | None = None,
    allow_pickle: bool = False,
    scratch: Path | None = None,
    refuse_disagreement: bool = True,
    keep_code: bool = False,
) -> PreparedMerge:
    """Read base and adapter, plan the merge, and check the plan's names and tying against
    transformers + PEFT (:mod:`loraship.engine.oracle`). Reads no tensor data (except opted-in pickles).

    Args:
        refuse_disagreement: Raise when the plan and transformers + PEFT disagree; otherwise the
            finding is returned in ``names`` (``verify`` reports it as a failed check).
        keep_code: Carry the base's Python files over (remote code; ``--trust-remote-code``).

    Raises:
        InputError: A folder holds a link out of it, or something that is not a regular file.
        UnsupportedError: The plan disagrees with transformers + PEFT (with ``refuse_disagreement``).
    """
    check_input_folder(adapter_dir, "adapter")
    check_input_folder(base_dir, "base")
    adapter_config = read_adapter_config(adapter_dir)
    base, config = load_base(base_dir, allow_pickle=allow_pickle, scratch=scratch / "base" if scratch else None)
    model, problem = None, None
    try:
        model = inspect_model(base_dir, base.tensors, adapter_config)
    except ModelMapError as e:  # the plan then matches names by a prefix at most, and refuses tied changes
        problem = str(e)
    adapter = load_adapter(adapter_dir, allow_pickle=allow_pickle, scratch=scratch / "adapter" if scratch else None,
                           param_order=model.param_order if model else None)  # fmt: skip
    plan = _plan(base, config, adapter, model, problem, dtype, base_dir)
    replaced = [p.relative_to(base_dir).as_posix() for p in base.files if p.is_relative_to(base_dir)]
    files = choose_files(base_dir, adapter_dir, replaced_weights=replaced, keep_code=keep_code)
    names = check_plan(base_dir, adapter, plan, model)
    if refuse_disagreement and not names.agrees:
        raise UnsupportedError(
            "loraship's merge plan disagrees with transformers + PEFT about where the adapter lands: "
            + "; ".join(names.disagreements[:5])
            + (f" (and {len(names.disagreements) - 5} more)" if len(names.disagreements) > 5 else "")
            + ". Nothing was written.",
            fix="This is a loraship bug: please report it with the adapter's adapter_config.json and the base's "
            "config.json. Until it is fixed, merge with PEFT (merge_and_unload) and check the result with "
            "`loraship verify`.",
        )
    return PreparedMerge(base_dir, adapter_dir, base, config, adapter, plan, tuple(files), model, problem, names)


def _plan(
    base: Checkpoint,
    config: Mapping[str, Any],
    adapter: AdapterSpec,
    model: ModelMap | None,
    model_problem: str | None,
    dtype: str | None,
    base_dir: Path,
) -> MergePlan:
    plan = plan_merge(base, config, adapter, model=model, dtype=dtype, base_label=str(base_dir))
    if model_problem:
        plan = replace(plan, notes=(*plan.notes, f"Names matched without transformers' model class: {model_problem}."))
    return plan


# --------------------------------------------------------------------------- output folder


def check_overlap(output: Path, inputs: Iterable[Path], *, fix: str) -> None:
    """Refuse an output folder that is, holds, or lies in an input folder (replacing it would delete them).

    Raises:
        OutputError: Naming both folders.
    """
    resolved = output.resolve()
    for path in inputs:
        p = path.resolve()
        if resolved == p or p.is_relative_to(resolved) or resolved.is_relative_to(p):
            raise OutputError(f"The output folder `{output}` overlaps the input folder `{path}`.", fix=fix)


def check_output(output: Path, *, overwrite: bool, inputs: tuple[Path, ...], needed_bytes: int) -> None:
    """Refuse an output location that is taken, overlaps the inputs, or lacks disk space.

    Raises:
        OutputError: With what to do instead.
    """
    check_overlap(output, inputs, fix="Choose an --output outside the base and adapter folders.")
    if output.exists() and not output.is_dir():
        raise OutputError(f"The output `{output}` exists and is not a folder.", fix="Choose another --output.")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise OutputError(
            f"The output folder `{output}` exists and is not empty.",
            fix="Pass --overwrite to replace it, or choose another --output.",
        )
    existing = existing_ancestor(output)
    if not os.access(existing, os.W_OK):
        raise OutputError(f"The output folder `{output}` cannot be created: `{existing}` is not writable.",
                          fix="Choose an --output in a folder you can write to.")  # fmt: skip
    free = shutil.disk_usage(existing).free
    if needed_bytes > free:
        raise OutputError(
            f"Not enough free disk space for the merged model: it needs {human_bytes(needed_bytes)} in `{existing}`, "
            f"which has {human_bytes(free)} free.",
            fix="Free some space, or choose an --output on a disk with more room.",
        )


@contextlib.contextmanager
def _write_errors(output: Path) -> Iterator[None]:
    """Operating-system errors while writing (disk full, permissions) are expected failures."""
    try:
        yield
    except OSError as e:
        raise OutputError(
            f"Writing the merged model into `{output}` failed: {e.strerror or e}.",
            fix="Check the free space and permissions of the output disk, then run again.",
        ) from e


def current_umask() -> int:
    """The process's umask (read by setting it, then restored)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_folder(output: Path, *, overwrite: bool) -> Iterator[Path]:
    """A temporary folder beside ``output`` that becomes ``output`` only if the block succeeds."""
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}{_PARTIAL_MARK}", dir=output.parent))
    tmp.chmod(0o777 & ~current_umask())  # not mkdtemp's 0700: a server running as another user must read it
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if output.exists():
        if not overwrite and any(output.iterdir()):
            shutil.rmtree(tmp, ignore_errors=True)
            raise OutputError(f"The output folder `{output}` appeared during the merge.", fix="Run again.")
        trash = Path(tempfile.mkdtemp(prefix=f".{output.name}.loraship-old-", dir=output.parent))
        os.replace(output, trash / "old")
        os.replace(tmp, output)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, output)


# --------------------------------------------------------------------------- execution


def shard_layout(plan: MergePlan, max_shard_size: int | str) -> dict[str, list[TensorPlan]]:
    """Output file name -> its tensors, split as transformers' save_pretrained names and splits them."""
    from huggingface_hub import split_state_dict_into_shards_factory

    by_name = {t.name: t for t in plan.tensors}
    split = split_state_dict_into_shards_factory(
        by_name, get_storage_size=lambda t: t.nbytes, filename_pattern=SHARD_PATTERN, max_shard_size=max_shard_size
    )
    # Within a shard, tensors copied as they are come first: they are written while torch imports.
    return {
        fname: sorted((by_name[n] for n in names), key=lambda t: not t.copies_bytes)
        for fname, names in split.filename_to_tensors.items()
    }


class ShardHooks(Protocol):
    """What a streaming run does around each output shard (:mod:`loraship.run.streaming`)."""

    def start(self, reader: TensorReader) -> None:
        """The merge's reader (a streaming run closes its files before deleting them)."""

    def before(self, shard: str, inputs: frozenset[Path]) -> None:
        """Block until the base files ``shard`` reads are on disk (may raise to stop the merge)."""

    def after(self, shard: str, path: Path, tensors: tuple[TensorPlan, ...]) -> None:
        """``path`` is complete (called in the writer's order); must not block for long."""

    def finish(self) -> None:
        """Every shard is written: block until the run is done with them (may raise to stop the merge)."""


def input_files(tensor: TensorPlan, by_name: Mapping[str, TensorPlan]) -> frozenset[Path]:
    """Every file ``tensor`` reads: its source, scales, packed parts, trained copies, LoRA factors,
    and, for requantized scales, what their weight reads."""
    found: set[Path] = set()

    def walk(value: Any, depth: int = 0) -> None:
        if isinstance(value, TensorInfo):
            found.add(value.file)
        if depth < 6 and dataclasses.is_dataclass(value) and not isinstance(value, type):
            for f in dataclasses.fields(value):
                walk(getattr(value, f.name), depth + 1)
        elif depth < 6 and isinstance(value, (tuple, list)):
            for item in value:
                walk(item, depth + 1)

    walk(tensor)
    for step in tensor.steps:
        if isinstance(step, ScalesStep) and step.weight in by_name:
            walk(by_name[step.weight])
    return frozenset(found)


def execute(
    prepared: PreparedMerge,
    output: Path,
    *,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    progress: bool = True,
    hooks: ShardHooks | None = None,
) -> MergeResult:
    """Write the merged model folder.

    ``hooks``: merge one output shard after the other, waiting for its inputs and handing each
    finished shard over (a streaming run); without them every untouched tensor is queued first.

    Raises:
        OutputError: The output is taken or the disk too small (checked before writing anything).
    """
    from tqdm.auto import tqdm

    plan = prepared.plan
    limit = parse_size(max_shard_size)
    other_bytes = sum(c.source.stat().st_size for c in prepared.files if c.source is not None)
    check_output(
        output,
        overwrite=overwrite,
        inputs=(prepared.base_dir, prepared.adapter_dir),
        needed_bytes=(plan.total_bytes if hooks is None else 0) + other_bytes + (1 << 20),  # streaming: preflight
    )
    start = time.monotonic()
    layout = shard_layout(plan, limit)
    written_files: list[str] = []
    bar = tqdm(total=plan.total_bytes, unit="B", unit_scale=True, desc="Merging", disable=not progress, leave=False)
    with (
        _write_errors(output),
        atomic_folder(output, overwrite=overwrite) as tmp,
        TensorReader() as reader,
        OrderedWriter() as writer,
    ):
        if hooks is None:
            _execute_all(layout, tmp, reader, writer, bar)
        else:
            hooks.start(reader)
            _execute_shards(plan, layout, tmp, reader, writer, hooks, bar)
        written_files.extend(layout)
        if len(layout) > 1:
            weight_map = {t.name: f for f, ts in layout.items() for t in ts}
            index = {"metadata": {"total_size": plan.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
            written_files.append(INDEX_NAME)
        others = copy_files(prepared.files, tmp, config_updates=plan.config_updates)
        if hooks is not None:
            hooks.finish()  # before the folder is renamed: the shards' checks and uploads read it
    bar.close()
    left_out = tuple((c.path, c.reason) for c in prepared.files if c.source is None)
    return MergeResult(
        output=output,
        prepared=prepared,
        weight_files=tuple(written_files),
        other_files=tuple(others),
        bytes_written=plan.total_bytes,
        seconds=time.monotonic() - start,
        left_out=left_out,
    )


def _execute_all(
    layout: Mapping[str, list[TensorPlan]], folder: Path, reader: TensorReader, writer: OrderedWriter, bar: Any
) -> None:
    """Every output shard at once: untouched tensors are queued first (copied while torch imports)."""
    shards = {}
    for fname, tensors in layout.items():
        specs = [OutputTensor(t.name, t.dtype, t.shape) for t in tensors]
        shards[fname] = shard = ShardWriter(folder / fname, specs, {"format": "pt"})
        writer.on_error(shard.abort)
        for t in tensors:
            if t.copies_bytes and t.source is not None:
                _copy(t, shard, reader, writer, bar)
    from loraship.engine.stream import TensorStreamer  # imports torch while the copies above run

    with TensorStreamer(reader) as streamer:
        for fname, tensors in layout.items():
            shard = shards[fname]
            for t in tensors:
                if not (t.copies_bytes and t.source is not None):
                    _compute(t, shard, streamer, writer, bar)
            writer.submit(shard.close)
        writer.drain()  # before the compute pool closes: the writer waits on its results


def _execute_shards(
    plan: MergePlan,
    layout: Mapping[str, list[TensorPlan]],
    folder: Path,
    reader: TensorReader,
    writer: OrderedWriter,
    hooks: ShardHooks,
    bar: Any,
) -> None:
    """One output shard after the other: wait for its inputs, write it, hand it over."""
    from loraship.engine.stream import TensorStreamer

    by_name = {t.name: t for t in plan.tensors}
    with TensorStreamer(reader) as streamer:
        for fname, tensors in layout.items():
            hooks.before(fname, frozenset().union(*(input_files(t, by_name) for t in tensors)))
            specs = [OutputTensor(t.name, t.dtype, t.shape) for t in tensors]
            shard = ShardWriter(folder / fname, specs, {"format": "pt"})
            writer.on_error(shard.abort)
            for t in tensors:
                if t.copies_bytes and t.source is not None:
                    _copy(t, shard, reader, writer, bar)
                else:
                    _compute(t, shard, streamer, writer, bar)
            writer.submit(shard.close)
            writer.submit(functools.partial(hooks.after, fname, folder / fname, tuple(tensors)))
        writer.drain()


def _copy(t: TensorPlan, shard: ShardWriter, reader: TensorReader, writer: OrderedWriter, bar: Any) -> None:
    assert t.source is not None
    writer.submit(functools.partial(shard.begin, t.name))
    writer.write_chunks(shard, [CopyChunk(reader.fd(t.source.file), t.source.offset, t.source.nbytes)], 0)
    writer.submit(functools.partial(bar.update, t.nbytes))


def _compute(t: TensorPlan, shard: ShardWriter, streamer: Any, writer: OrderedWriter, bar: Any) -> None:
    writer.submit(functools.partial(shard.begin, t.name))
    for work, nbytes in streamer.work(t):
        writer.write_chunks(shard, work, nbytes)
    writer.submit(functools.partial(bar.update, t.nbytes))


def merge(
    base_dir: Path,
    adapter_dir: Path,
    output: Path,
    *,
    dtype: str | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    allow_pickle: bool = False,
    progress: bool = True,
    keep_code: bool = False,
    requantize: bool = False,
) -> MergeResult:
    """Merge the adapter in ``adapter_dir`` into the base in ``base_dir``, writing ``output``.

    Args:
        base_dir: The base model folder (config.json + safetensors weights).
        adapter_dir: The adapter folder (adapter_config.json + adapter_model.safetensors).
        output: The merged model folder to write.
        dtype: Output dtype (``bfloat16``, ``float16``, ``float32``); None keeps each tensor's.
        max_shard_size: Largest output shard (``5GB``).
        overwrite: Replace a non-empty ``output``.
        allow_pickle: Accept pickled ``.bin`` weights (loaded with ``weights_only=True``).
        progress: Show a progress bar over bytes written.
        keep_code: Carry the base's Python files (remote code) into the output.
        requantize: For a block-scaled FP8 base: write the merged weights in FP8 with the base's
            blocks (lossy) instead of 16 bits.

    Returns:
        What was written, with the plan.

    Raises:
        LorashipError: Any expected failure, with what to do about it; nothing is written then.
    """
    parse_size(max_shard_size)
    with tempfile.TemporaryDirectory(prefix="loraship-scratch-") as scratch:
        prepared = prepare_merge(base_dir, adapter_dir, dtype=dtype, allow_pickle=allow_pickle, scratch=Path(scratch),
                                 keep_code=keep_code)  # fmt: skip
        if requantize:
            prepared = prepared.requantized()
        return execute(prepared, output, max_shard_size=max_shard_size, overwrite=overwrite, progress=progress)
