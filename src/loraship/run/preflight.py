"""Before a weight is downloaded: will the run fit on this machine's disks and in its memory?

A run holds the base in the Hugging Face cache and the merged model in a staging folder, then
loads one model at a time for the output check. On a GitHub-hosted runner (about 14 GB free disk,
16 GB RAM) a model above ~3 B parameters does not fit, and finding out after a 20-minute download
(or from the kernel's OOM killer, with no message at all) is the worst way to learn it. The sizes
come from the Hub's file listing (or the local folder) and the config, before anything is read.

The preflight stage of a run is :func:`check_machine`: it takes the run's context, the base's
config and file sizes, and returns nothing, or raises :class:`ResourceError`.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraship.engine.repo_files import WEIGHT_SUFFIXES
from loraship.engine.writer import existing_ancestor
from loraship.errors import ResourceError
from loraship.text import human_bytes

if TYPE_CHECKING:
    from loraship.run.context import RunContext

#: Room kept free beyond the estimate: metadata, the config and tokenizer files, rounding.
MARGIN = 64 << 20
#: Bytes per value of each config dtype; FP8 bases store one byte per value, MXFP4 about half a byte.
_ELEMENT = {"float32": 4, "float64": 8, "bfloat16": 2, "float16": 2}
_QUANTIZED_ELEMENT = {"fp8": 1.0, "mxfp4": 0.53}


@dataclass(frozen=True)
class Need:
    """Bytes a stage of the run writes under ``path``."""

    what: str
    path: Path
    nbytes: int


@dataclass(frozen=True)
class Sizes:
    """Bytes per weight value: as the base stores it, as the merge writes it, as the output check loads it."""

    stored: float
    written: float
    loaded: float
    loaded_dtype: str


def element_sizes(config: Mapping[str, Any], out_dtype: str | None, check_dtype: str, *, requantize: bool) -> Sizes:
    """The bytes per value of the base's weights, the merged weights and the output check's models
    (``check_dtype``: ``auto`` for the merged model's 16-bit dtype)."""
    from loraship.engine import quantized

    config_dtype = str(config.get("dtype") or config.get("torch_dtype") or "bfloat16")
    sixteen = _ELEMENT.get(out_dtype or config_dtype, 2)  # what a dequantized or converted tensor is written in
    method = quantized.method(config) or ""
    stored = _QUANTIZED_ELEMENT.get(method, _ELEMENT.get(config_dtype, 2))
    written = stored if requantize and method in _QUANTIZED_ELEMENT else sixteen
    loaded_dtype = check_dtype if check_dtype in _ELEMENT else (out_dtype or config_dtype)
    return Sizes(stored, written, _ELEMENT.get(loaded_dtype, 2), loaded_dtype)


#: What lowers the disk a sequential run needs.
DISK_FIX = (
    "Free space there, or put the Hugging Face cache (HF_HUB_CACHE or HF_HOME) and the staging folder (--workdir) "
    "on disks with more room, or run on a machine with a larger disk."
)


def check_disk(needs: Sequence[Need], *, fix: str = DISK_FIX) -> None:
    """Refuse when the needs of one filesystem add up to more than it has free.

    Raises:
        ResourceError: Naming what needs how much where, what is free, and what lowers it.
    """
    by_device: dict[int, list[tuple[Need, Path]]] = {}
    for need in needs:
        if need.nbytes <= 0:
            continue
        existing = existing_ancestor(need.path)
        by_device.setdefault(existing.stat().st_dev, []).append((need, existing))
    for group in by_device.values():
        total = sum(n.nbytes for n, _ in group) + MARGIN
        where = group[0][1]
        free = shutil.disk_usage(where).free
        if total > free:
            parts = "; ".join(f"{n.what}: {human_bytes(n.nbytes)} in `{n.path}`" for n, _ in group)
            raise ResourceError(
                f"Not enough disk space for this run: it needs about {human_bytes(total)} on the disk of `{where}` "
                f"({parts}), which has {human_bytes(free)} free. Nothing was downloaded.",
                fix=fix,
            )


def check_memory(model_bytes: int, dtype: str, *, cap: int | None = None) -> None:
    """Refuse an output check on CPU that cannot hold the model in memory (or ``cap`` of it: the
    ``max_memory`` setting, past which layers are read from disk).

    Raises:
        ResourceError: With the size, what is available, and the settings that avoid it.
    """
    available = available_memory()
    held = model_bytes if cap is None else min(cap, model_bytes)
    needed = int(held * 1.15) + (512 << 20)  # activations, the tokenizer, Python itself
    if available is None or needed <= available:
        return
    if cap is not None:
        raise ResourceError(
            f"The output check keeps up to max_memory = {human_bytes(cap)} of weights in memory, about "
            f"{human_bytes(needed)} with the rest it needs, and this machine has {human_bytes(available)} available. "
            "Nothing was downloaded.",
            fix="Lower `max_memory` (`verify: {max_memory: ...}` or --max-memory), or check the weights only "
            "(`verify: {outputs: false}`).",
        )
    raise ResourceError(
        f"The output check loads the model into memory, one model at a time: about {human_bytes(needed)} in {dtype}, "
        f"and this machine has {human_bytes(available)} available. Nothing was downloaded.",
        fix="Run on a machine with more memory or a GPU (`verify: {device: cuda}`), set `verify: {max_memory: 1GB}` "
        "(or --max-memory 1GB: the layers that do not fit are read from disk as they run, slower), or check the "
        "weights only (`verify: {outputs: false}`; every merged tensor is still compared bit for bit with base + "
        "adapter).",
    )


def available_memory() -> int | None:
    """Memory this process can still use: the kernel's MemAvailable, capped by the cgroup (a
    container's limit); None where neither can be read (not Linux)."""
    values = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                values.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
            values.append(int(limit) - used)
    except (OSError, ValueError):
        pass
    return min(values) if values else None


def cpu_output_check(device: str) -> bool:
    """Whether the output check will run on the CPU (``auto`` without CUDA)."""
    if device == "cpu":
        return True
    if device == "cuda":
        return False
    import torch

    return not torch.cuda.is_available()


def check_machine(
    ctx: RunContext,
    config: Mapping[str, Any],
    base_sizes: Mapping[str, int],
    download: int,
    *,
    streaming: Path | None = None,
    keep: bool = True,
    largest_tensor: int | None = None,
) -> None:
    """Refuse, before downloading, a run this machine's disks or memory cannot hold.

    ``streaming``: the folder a streaming run downloads the base's weights into (not the cache);
    without ``keep``, only a few base and merged shards are on disk at once (an output shard is
    at most the larger of the shard size and ``largest_tensor``, both as written).
    """
    from huggingface_hub import constants

    from loraship.run.streaming import BASE_WINDOW, OUTPUT_WINDOW
    from loraship.text import parse_size

    job, spec = ctx.job, ctx.job.verify
    e = element_sizes(config, ctx.out_dtype(), spec.dtype, requantize=job.requantize)
    weight_sizes = [n for f, n in base_sizes.items() if f.endswith(WEIGHT_SUFFIXES)]
    weights = sum(weight_sizes)
    others = sum(base_sizes.values()) - weights
    merged = int(weights / e.stored * e.written)
    staging = ctx.work if ctx.target.path is None else ctx.target.path.resolve().parent
    if streaming is None:
        check_disk([
            Need("the base's files, downloaded to the Hugging Face cache", Path(constants.HF_HUB_CACHE), download),
            Need("the merged model, staged", staging, merged + others),
        ])  # fmt: skip
    elif keep:
        why = (
            "the output check reads both whole models" if spec.enabled and spec.outputs else "the merged model is kept"
        )
        check_disk([
            Need("the base's weights, downloaded for this run", streaming, download),
            Need("the merged model, staged", staging, merged + others),
        ], fix=f"Free space there, or put the run's folder (--workdir) on a disk with more room. Both models are "
               f"on disk because {why}: with `verify: {{outputs: false}}` (every merged tensor is still compared "
               "bit for bit with base + adapter) a run to the Hub holds only a few shards at a time.")  # fmt: skip
    else:
        biggest = max(weight_sizes, default=0)
        tensor = biggest if largest_tensor is None else largest_tensor
        shard = min(merged, max(parse_size(job.shard_size), int(tensor / e.stored * e.written)))
        check_disk([
            Need(f"{BASE_WINDOW + 1} of the base's weight files at a time", streaming,
                 min(download, (BASE_WINDOW + 1) * biggest)),
            Need(f"{OUTPUT_WINDOW} merged shards at a time", staging, min(merged, OUTPUT_WINDOW * shard) + others),
        ], fix="Free space there, or put the run's folder (--workdir) on a disk with more room, or write smaller "
               "shards (`max_shard_size` in loraship.yaml, or --max-shard-size).")  # fmt: skip
    if spec.enabled and spec.outputs and cpu_output_check(spec.device):
        check_memory(int(weights / e.stored * e.loaded), e.loaded_dtype, cap=spec.max_memory_bytes)
