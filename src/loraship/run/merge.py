"""Merge stage: base + adapter into the staging folder, with the uploads that overlap it.

Two ways, each taking the run's context, the base and adapter, the staging folder, and returning
:class:`Merged`:

- :func:`merge_whole` (the sequential path): merges, then starts uploading the weights while the
  check stage verifies them, when the output repo exists.
- :func:`stream_merge` (a streaming run): merges shard by shard while the base downloads, and
  checks and uploads each shard as it is written (:mod:`loraship.run.streaming`); it records in the
  :class:`~loraship.run.output.Cleanup` the output repo it creates for that upload.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from loraship.engine.merge import MergeResult, PreparedMerge
from loraship.engine.plan import TensorPlan
from loraship.hub.client import Hub, PreUpload
from loraship.run.context import Input, RunContext
from loraship.run.fetch import StreamedBase
from loraship.run.output import Cleanup
from loraship.run.streaming import BaseFeed, StreamResult


@dataclass(frozen=True)
class Merged:
    """What the merge stage hands on to the check and publish stages."""

    prepared: PreparedMerge
    result: MergeResult | None  # None only when a streamed shard failed its check (the check stage raises)
    preupload: PreUpload | None = None  # the sequential path: the weights uploading while they are verified
    stream: StreamResult | None = None  # a streaming run: what the stream checked and uploaded
    stopped: bool = False  # a streaming run stopped at a shard that failed its check


def merge_whole(ctx: RunContext, base: Input, adapter: Input, staging: Path) -> Merged:
    job = ctx.job
    ctx.log(f"Merging into {staging} ...")
    from loraship.engine.merge import merge

    result = merge(base.folder, adapter.folder, staging, dtype=ctx.out_dtype(),
                   max_shard_size=job.shard_size, overwrite=True, allow_pickle=job.allow_pickle,
                   progress=ctx.progress, keep_code=job.trust_remote_code,
                   requantize=job.requantize)  # fmt: skip
    return Merged(result.prepared, result, preupload=_start_preupload(ctx, staging, result.weight_files))


def stream_merge(ctx: RunContext, streamed: StreamedBase, adapter: Input, staging: Path, cleanup: Cleanup) -> Merged:
    """Merge shard by shard while the base downloads; check and upload each shard as it is written."""
    from loraship.engine.merge import execute, prepare_merge, shard_layout
    from loraship.run.streaming import ShardStream, StreamStopped

    job, spec = ctx.job, ctx.job.verify
    base = streamed.base
    keep = ctx.keep()
    with tempfile.TemporaryDirectory(prefix="loraship-scratch-") as scratch:
        prepared = prepare_merge(base.folder, adapter.folder, dtype=ctx.out_dtype(),
                                 allow_pickle=job.allow_pickle, scratch=Path(scratch),
                                 keep_code=job.trust_remote_code)  # fmt: skip
        if job.requantize:
            prepared = prepared.requantized()
        layout = shard_layout(prepared.plan, job.shard_size)
        feed = _feed(ctx, prepared, layout, base, streamed.downloads, keep) if streamed.downloads else None
        stream = ShardStream(prepared, layout, feed, check=spec.enabled and not keep,
                             upload=_stream_upload(ctx, keep, cleanup), keep=keep)  # fmt: skip
        ctx.log(f"Merging into {staging}, shard by shard" + (", uploading each once checked" if stream.upload
                                                              else "") + " ...")  # fmt: skip
        stopped = False
        result: MergeResult | None = None
        try:
            result = execute(prepared, staging, max_shard_size=job.shard_size, overwrite=True,
                             progress=ctx.progress, hooks=stream)  # fmt: skip
        except StreamStopped:
            if not stream.check:
                raise
            stopped = True  # a shard failed its check: the check stage's report says which, and why
        finally:
            stream.close()
            if feed is not None:
                feed.close()
    return Merged(prepared, result, stream=stream.result, stopped=stopped)


def _feed(
    ctx: RunContext,
    prepared: PreparedMerge,
    layout: dict[str, list[TensorPlan]],
    base: Input,
    downloads: Sequence[str],
    keep: bool,
) -> BaseFeed:
    """The base's weight files, downloaded in the order the merge reads them."""
    from loraship.engine.merge import input_files
    from loraship.run.streaming import BASE_WINDOW

    by_name = {t.name: t for t in prepared.plan.tensors}
    uses = [p.name for ts in layout.values() for t in ts for p in sorted(input_files(t, by_name))
            if p.parent == base.folder and p.name in downloads]  # fmt: skip
    order = list(dict.fromkeys([*uses, *downloads]))
    assert base.state is not None
    return BaseFeed(ctx.hub_client(), base.state, base.folder, order,
                    window=len(order) + 1 if keep else BASE_WINDOW)  # fmt: skip


def _stream_upload(ctx: RunContext, keep: bool, cleanup: Cleanup) -> tuple[Hub, str, bool] | None:
    """Where a streaming run uploads its shards as they are checked, if anywhere."""
    repo_id = ctx.target.repo_id
    if repo_id is None or ctx.dry_run:
        return None
    hub = ctx.hub_client()
    if hub.head(repo_id) is None:
        if keep:  # the output check runs on the whole model: a new repo is made once it passed
            return None
        cleanup.created = hub.create_empty(repo_id, private=ctx.job.private)
        ctx.log(f"Created {hub.url(repo_id)} empty, to upload each shard once it is checked; nothing is "
                "committed until every shard passed, and the repo is deleted again if the run fails.")  # fmt: skip
    return (hub, repo_id, ctx.job.publish.mode == "pr")


def _start_preupload(ctx: RunContext, staging: Path, weight_files: Sequence[str]) -> PreUpload | None:
    """Upload the weights while they are verified, when the output repo already exists (a new one
    is created only once verification passed): nothing is visible until the commit."""
    repo_id = ctx.target.repo_id
    if repo_id is None or ctx.dry_run or not ctx.job.verify.enabled or ctx.hub_client().head(repo_id) is None:
        return None
    shards = [f for f in weight_files if f.endswith(".safetensors")]
    ctx.log(f"Uploading {len(shards)} weight file(s) while verifying (no commit until verification passes) ...")
    return ctx.hub_client().preupload(repo_id, staging, shards, create_pr=ctx.job.publish.mode == "pr")
