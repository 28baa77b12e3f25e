"""What every stage of a run is handed: the job, the Hub client, the folders, the flags, where messages go.

:class:`RunContext` is built once by :func:`loraship.run.pipeline.run` and passed to each stage;
:class:`Input` is a resolved input (the adapter from the resolve stage, the base from the fetch stage).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

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

    def out_dtype(self) -> str | None:
        return None if self.job.dtype == "keep" else self.job.dtype

    def keep(self) -> bool:
        """Whether a streaming run keeps every shard on disk: the output check reads both whole
        models; a folder output or a dry run keeps the merged model."""
        spec = self.job.verify
        return (spec.enabled and spec.outputs) or self.target.is_local or self.dry_run


@dataclass(frozen=True)
class Input:
    """A resolved input: where its files are, and which commit they come from."""

    source: Source
    folder: Path
    state: RepoState | None = None

    @property
    def label(self) -> str:
        return str(self.state) if self.state else str(self.source.path)

    @property
    def name(self) -> str:
        return self.state.repo_id if self.state else str(self.source.path)
