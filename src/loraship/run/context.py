"""What every stage of a run is handed: the job, the Hub client, the folders, the flags, where messages go.

:class:`RunContext` is built once by :func:`loraship.run.pipeline.run` and passed to each stage;
:class:`Input` is a resolved input (the adapter from the resolve stage, the base from the fetch stage).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from loraship.engine.repo_files import CONFIG_NAME
from loraship.hub.client import Hub, RepoState
from loraship.run.job import MergeJob, Source

Log = Callable[[str], None]


@dataclass(frozen=True)
class RunContext:
    """One run's job and settings, as :func:`~loraship.run.pipeline.run` was called (see its arguments)."""

    job: MergeJob
    target: Source  # the job's output, parsed once
    hub: Hub | None
    work: Path
    dry_run: bool
    overwrite: bool
    progress: bool
    stream: bool
    log: Log
    stage: Log

    def hub_client(self) -> Hub:
        assert self.hub is not None
        return self.hub

    @property
    def output_label(self) -> str:
        """How the report names the merged model: the output repo id, or the ``dir:`` folder's name."""
        if self.target.repo_id:
            return self.target.repo_id
        return self.target.path.resolve().name if self.target.path else "merged"

    def out_dtype(self) -> str | None:
        return None if self.job.dtype == "keep" else self.job.dtype

    def keep(self) -> bool:
        """Whether a streaming run keeps every shard on disk: the output check reads both whole
        models; a folder output or a dry run keeps the merged model."""
        spec = self.job.verify
        return (spec.enabled and spec.outputs) or self.target.is_local or self.dry_run


@dataclass(frozen=True)
class Input:
    """A resolved input: where its files are, and which commit they come from.

    ``config_name`` is the file that identifies a local input (``config.json`` for a base,
    ``adapter_config.json`` for an adapter): see :func:`local_name`.
    """

    source: Source
    folder: Path
    state: RepoState | None = None
    config_name: str = CONFIG_NAME

    @property
    def label(self) -> str:
        """How everything the run writes names it: ``repo@sha``, or the local folder's :func:`local_name`."""
        return str(self.state) if self.state else self.local_name

    @property
    def name(self) -> str:
        """The repo id, or the local folder's :func:`local_name` (never a path of this machine)."""
        return self.state.repo_id if self.state else self.local_name

    @functools.cached_property
    def local_name(self) -> str:
        return local_name(self.source.path or self.folder, self.config_name)

    @property
    def local_id(self) -> str | None:
        """What identifies a local input in the provenance key (``local:`` + its config's hash); None from the Hub."""
        if self.state is not None:
            return None
        digest = content_digest(self.source.path or self.folder, self.config_name)
        return f"local:{digest}" if digest else "local"


def local_name(folder: Path, config_name: str) -> str:
    """How a local input is named in the card, the report and the commit: its folder's name and a hash
    of its config, e.g. ``base (local, config sha256:1a2b3c4d5e6f)``; no path of this machine."""
    name = folder.resolve().name or "folder"
    digest = config_digest(folder, config_name)
    return f"{name} (local, config sha256:{digest})" if digest else f"{name} (local)"


def config_digest(folder: Path, config_name: str) -> str | None:
    """The first 12 hex digits of the SHA-256 of the folder's config file's bytes; None without one."""
    try:
        data = (folder / config_name).read_bytes()
    except OSError:
        return None
    return hashlib.sha256(data).hexdigest()[:12]


def content_digest(folder: Path, config_name: str) -> str | None:
    """What the provenance key holds for a local input: a SHA-256 (first 12 hex digits) of its config and of
    its weights, so that a retrained adapter whose config did not change is not taken as already published.

    An adapter's weight files are hashed whole (they are small); a base's by name, size and safetensors
    header (shapes, dtypes and offsets), not its gigabytes of data. None without a config file.
    """
    try:
        digest = hashlib.sha256((folder / config_name).read_bytes())
        whole = config_name != CONFIG_NAME
        for file in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
            digest.update(file.name.encode() + b"\0" + str(file.stat().st_size).encode() + b"\0")
            with file.open("rb") as f:
                if whole:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        digest.update(block)
                elif file.suffix == ".safetensors":
                    size = int.from_bytes(f.read(8), "little")
                    digest.update(f.read(min(size, 100 << 20)))
    except OSError:
        return None
    return digest.hexdigest()[:12]
