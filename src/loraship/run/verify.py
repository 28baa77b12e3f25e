"""Check stage: nothing goes further unless the merged model passed (or the job turned checking off).

:func:`check` takes the run's context, the base and adapter, the staging folder and the merge
stage's :class:`~loraship.run.merge.Merged`; it returns :class:`Checked`, the merge's result with
the verification report (None when verification is off), or raises :class:`VerificationFailed`
after printing the report. A streaming run that checked each shard as it was written assembles
their report; any other run verifies the staged folder against base + adapter.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from loraship.engine.merge import MergeResult
from loraship.run.context import Input, RunContext
from loraship.run.merge import Merged

if TYPE_CHECKING:
    from loraship.check.verify import VerifyReport


@dataclass(frozen=True)
class Checked:
    """What the check stage hands on to the card and the run's result."""

    result: MergeResult
    report: VerifyReport | None


def check(ctx: RunContext, base: Input, adapter: Input, staging: Path, merged: Merged) -> Checked:
    spec = ctx.job.verify
    if merged.stream is None or ctx.keep() or not spec.enabled:
        report = verify_merged(ctx, base, adapter, staging)
    else:
        report = _streamed(ctx, base, adapter, merged)
    assert merged.result is not None  # a stream stops early only at a shard that failed: its report raised
    return Checked(merged.result, report)


def verify_merged(ctx: RunContext, base: Input, adapter: Input, merged: Path) -> VerifyReport | None:
    spec = ctx.job.verify
    if not spec.enabled:
        ctx.log("Verification is turned off for this job.")
        return None
    ctx.log("Verifying the merged model against base + adapter ...")
    from loraship.check.outputs import load_prompts
    from loraship.check.verify import raise_if_failed, render_text, verify

    prompts = spec.prompts
    if isinstance(prompts, str):
        prompts = load_prompts(Path(prompts))
    report = verify(
        base.folder, adapter.folder, merged, outputs=spec.outputs, prompts=prompts, device=spec.device,
        dtype=spec.dtype, threshold_overrides=spec.threshold_overrides(), weight_atol=spec.weight_atol,
        trust_remote_code=ctx.job.trust_remote_code, allow_pickle=ctx.job.allow_pickle,
        labels=(base.label, adapter.label, ctx.output_label), progress=ctx.progress,
        max_memory=spec.max_memory_bytes,
    )  # fmt: skip
    ctx.log(render_text(report))
    raise_if_failed(report)
    return report


def _streamed(ctx: RunContext, base: Input, adapter: Input, merged: Merged) -> VerifyReport:
    """The report of the shards the stream checked as they were written."""
    from loraship.check.verify import raise_if_failed, render_text, streamed_report

    stream = merged.stream
    assert stream is not None
    labels = (base.label, adapter.label, ctx.output_label)
    report = streamed_report(merged.prepared, stream.weights, stream.tensors, stream.library,
                             stream.shards, labels, stopped=merged.stopped)  # fmt: skip
    ctx.log(render_text(report))
    raise_if_failed(report)
    assert not merged.stopped
    return report
