"""Publish stage: one commit (or pull request) with every file, the provenance in its title; then the tag.

- :func:`published` (before anything large is downloaded) takes the run's context and the provenance
  key, and returns the publication of this merge already on the Hub, if any; :func:`already` turns
  it into the run's :class:`~loraship.run.result.RunResult` (adding a tag the earlier run left out).
- :func:`publish` takes the run's context, the staged folder, the base, the merge stage's
  :class:`~loraship.run.merge.Merged` (uploads already done), the key and the result so far; it
  checks once more that nobody published this merge meanwhile, commits (reusing the uploads), and
  returns the result, ``published`` or ``already-published``.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from loraship import __version__
from loraship.hub.client import CommitConflict, Publication
from loraship.run.context import Input, RunContext
from loraship.run.job import MergeJob
from loraship.run.merge import Merged
from loraship.run.result import RunResult
from loraship.run.streaming import reusable


def published(ctx: RunContext, key: str) -> Publication | None:
    """The output repo's publication of this provenance (None for a ``dir:`` output)."""
    if ctx.target.is_local:
        return None
    return ctx.hub_client().find_publication(ctx.target.repo_id or "", key)


def publish(ctx: RunContext, staging: Path, base: Input, merged: Merged, key: str, done: RunResult) -> RunResult:
    hub = ctx.hub_client()
    job = ctx.job
    repo_id = ctx.target.repo_id or ""
    reuse = _reuse(ctx, staging, merged)
    parent = hub.head(repo_id)
    found = hub.find_publication(repo_id, key)  # again: a run beside this one may have finished first
    if found is not None:
        return already(ctx, found, key, (done.base, done.adapter))
    gated = _gating(job, base)
    title = commit_title(job, base, key)
    description = (
        f"Merged and verified by loraship {__version__}.\n\n"
        f"- base: {done.base}\n- adapter: {done.adapter}\n- job hash: {job.job_hash()}\n"
        f"- verification: {'passed' if done.verified else 'not run'}\n"
    )
    ctx.stage("Publish")
    ctx.log(f"Publishing to {hub.url(repo_id)} ...")
    try:
        publication = hub.publish(
            staging, repo_id, private=job.private, gated=gated, title=title, description=description,
            create_pr=job.publish.mode == "pr", tag=job.publish.tag, parent_commit=parent, reuse=reuse,
        )  # fmt: skip
    except CommitConflict:
        # Someone committed first: maybe this very merge (an earlier attempt whose reply was lost).
        found = hub.find_publication(repo_id, key)
        if found is None:
            raise
        return already(ctx, found, key, (done.base, done.adapter))
    return replace(done, status="published", repo_url=publication.repo_url, commit_sha=publication.commit_sha,
                   tag=publication.tag, pr_url=publication.pr_url,
                   message=f"Published {publication.link}.")  # fmt: skip


def _reuse(ctx: RunContext, staging: Path, merged: Merged) -> dict[str, Any]:
    """The uploads the commit can reference instead of uploading again: the streamed shards, or the
    weights uploaded during verification."""
    reuse: dict[str, Any] = {}
    if merged.stream is not None:
        reuse = reusable(merged.stream, staging)
        if merged.stream.upload_problem:
            ctx.log(f"The upload while merging did not finish ({merged.stream.upload_problem}): uploading now.")
    elif merged.preupload is not None:
        reuse = merged.preupload.wait()
        if merged.preupload.problem:
            ctx.log(f"The upload during verification did not finish ({merged.preupload.problem}): uploading now.")
    return reuse


def _gating(job: MergeJob, base: Input) -> str | None:
    mode = job.publish.gated
    if mode == "off":
        return None
    if mode in ("auto", "manual"):
        return mode
    gated = base.state.gated if base.state else False
    return str(gated) if gated in ("auto", "manual") else None


def already(ctx: RunContext, found: Publication, key: str, labels: tuple[str, str]) -> RunResult:
    job = ctx.job
    tag = job.publish.tag
    message = f"Already published at {found.link}: nothing to do."
    if tag and found.commit_sha:  # a run stopped between its commit and its tag leaves the tag to us
        ctx.hub_client().ensure_tag(ctx.target.repo_id or "", tag, found.commit_sha)
        message = f"Already published at {found.link} (tag `{tag}`): nothing to do."
    ctx.log(message)
    return RunResult(job=job.name, status="already-published", output=job.output, base=labels[0],
                     adapter=labels[1], provenance=key, repo_url=found.repo_url, commit_sha=found.commit_sha,
                     tag=tag if found.commit_sha else None, pr_url=found.pr_url, message=message)  # fmt: skip


def commit_title(job: MergeJob, base: Input, key: str) -> str:
    if job.publish.commit_message:
        return f"{job.publish.commit_message} {key}"
    adapter = job.adapter_source.repo_id or "a local adapter"
    return f"Merge {adapter} into {base.name} {key}"
