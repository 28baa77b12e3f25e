"""Report stage: :class:`RunResult`, what a run did, for people and for the Action and the bot.

:func:`merged_result` takes the job, the inputs, the provenance key and the check stage's
:class:`~loraship.run.verify.Checked`, and returns the result of a merged model not yet gone
anywhere (``dry-run``); :func:`dry_run_result` and :func:`written_result` finish it for a dry run
and a ``dir:`` output, :func:`loraship.run.publish.publish` for the Hub.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from loraship.run.context import Input
from loraship.run.job import MergeJob
from loraship.run.verify import Checked

Status = Literal["published", "already-published", "written", "dry-run"]


@dataclass(frozen=True)
class RunResult:
    """What a run did, for people (``table``) and for the Action and the bot (``to_json``)."""

    job: str
    status: Status
    output: str
    base: str
    adapter: str
    provenance: str
    repo_url: str | None = None
    commit_sha: str | None = None
    tag: str | None = None
    pr_url: str | None = None
    folder: str | None = None
    verified: bool | None = None
    report: dict[str, Any] | None = None
    report_markdown: str | None = None
    message: str = ""
    notes: tuple[str, ...] = field(default_factory=tuple)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def merged_result(job: MergeJob, base: Input, adapter: Input, key: str, checked: Checked) -> RunResult:
    report = checked.report
    notes = checked.result.prepared.notes
    return RunResult(
        job=job.name, status="dry-run", output=job.output, base=base.label, adapter=adapter.label, provenance=key,
        verified=report.passed if report else None, report=report.to_json() if report else None,
        report_markdown=report.to_markdown() if report else None, notes=tuple(notes),
    )  # fmt: skip


def dry_run_result(done: RunResult, staging: Path) -> RunResult:
    message = f"Dry run: the repo's files are in {staging}; nothing was published."
    return replace(done, folder=str(staging), message=message)


def written_result(done: RunResult, folder: Path) -> RunResult:
    return replace(done, status="written", folder=str(folder), message=f"Wrote {folder}.")
