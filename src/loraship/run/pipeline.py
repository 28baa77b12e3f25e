"""``run(job)``: resolve, fetch, merge, verify, card, publish — the product's main job.

1. **Resolve** adapter and base to commit SHAs first, and use those SHAs for everything after.
2. **Already published?** The output repo is searched for this provenance (base SHA, adapter SHA,
   job hash) before anything large is downloaded; if found, nothing is done.
3. **Fetch** only what is needed: safetensors weights, configs, tokenizer and chat template, cards.
4. **Merge** into a staging folder, **verify** it (nothing is published if verification fails),
   write the **card**.
5. **Publish**: one commit (or pull request) with every file, the provenance in its title, after
   checking once more that nobody published it meanwhile; then the tag. Or, for ``dir:`` outputs,
   the staged folder is renamed into place.

Each stage is a function of its own module, taking the run's :class:`~loraship.run.context.RunContext`
and what the stages before it handed on (frozen dataclasses), read here from top to bottom:
preflight of the output (:mod:`.output`), resolve (:mod:`.resolve`), already published?
(:mod:`.publish`), fetch or stream the base, with the preflight of disks and memory (:mod:`.fetch`,
:mod:`.preflight`), merge (:mod:`.merge`), check (:mod:`.verify`), card (:mod:`.model_card`), the
run's result (:mod:`.result`), publish (:mod:`.publish`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from loraship.errors import LorashipError
from loraship.hub.client import Hub
from loraship.run.context import Log, RunContext
from loraship.run.disk import WORKDIR, full_disk, full_disk_error
from loraship.run.fetch import base_files, fetch_base, full_precision_guess, stream_base
from loraship.run.job import MergeJob
from loraship.run.merge import merge_whole, stream_merge
from loraship.run.model_card import write_card
from loraship.run.output import Cleanup, check_overlap, check_write_access, move_into_place, staging_folder
from loraship.run.publish import already, commit_title, publish, published
from loraship.run.resolve import adapter_files, names_hub_base, provenance_key, resolve
from loraship.run.result import RunResult, Status, dry_run_result, merged_result, written_result
from loraship.run.verify import check

__all__ = [
    "RunResult",
    "Status",
    "adapter_files",
    "base_files",
    "commit_title",
    "full_precision_guess",
    "provenance_key",
    "run",
]


def run(
    job: MergeJob,
    *,
    hub: Hub | None = None,
    workdir: Path | None = None,
    dry_run: bool = False,
    overwrite: bool = False,
    progress: bool = False,
    stream: bool = True,
    log: Log = print,
    stage: Log | None = None,
) -> RunResult:
    """Carry out one job; see the module docstring.

    Args:
        hub: The Hub client (built from HF_TOKEN / HF_ENDPOINT when None and a repo is involved).
        workdir: Where the merged folder is staged (a temporary folder when None).
        dry_run: Do everything but publish; the staged folder is kept and reported.
        stream: For a base on the Hub: download, merge, check and upload shard by shard
            (:mod:`loraship.run.streaming`); False downloads the whole base first (the sequential path).
        overwrite: For ``dir:`` outputs, replace a non-empty folder.
        log: Where progress messages go.
        stage: Called with each stage's name as it starts (resolve, fetch, merge, verify, publish).

    Raises:
        LorashipError: Any expected failure; nothing is published then.
    """
    hub = hub or (Hub() if needs_hub(job) else None)
    owned = workdir is None
    work = Path(tempfile.mkdtemp(prefix="loraship-run-")) if workdir is None else workdir
    made = _first_missing(work)  # the folders this run creates for a --workdir: removed again if it fails
    work.mkdir(parents=True, exist_ok=True)
    try:
        ctx = RunContext(job, job.output_target, hub, work, dry_run=dry_run, overwrite=overwrite, progress=progress,
                         stream=stream, log=log, stage=stage or (lambda name: None))  # fmt: skip
        return _run(ctx)
    except BaseException:
        if made is not None and not owned:
            shutil.rmtree(made, ignore_errors=True)
        raise
    finally:
        if owned and not dry_run:
            shutil.rmtree(work, ignore_errors=True)


def _first_missing(folder: Path) -> Path | None:
    """The outermost folder of ``folder``'s path that does not exist yet (None when ``folder`` exists)."""
    folder = folder.absolute()
    missing = None
    while not folder.exists() and folder != folder.parent:
        missing, folder = folder, folder.parent
    return missing


def needs_hub(job: MergeJob) -> bool:
    """Whether the job reads or writes a Hub repo: its adapter, its output, or its base, named by the job
    or, when the job names none, by a local adapter's adapter_config.json."""
    if not (job.adapter_source.is_local and job.output_target.is_local):
        return True
    if job.base_source is not None:
        return not job.base_source.is_local
    assert job.adapter_source.path is not None
    return names_hub_base(job.adapter_source.path)


def _run(ctx: RunContext) -> RunResult:
    """The preflight of the output, then the stages; a run that fails leaves nothing behind."""
    if not ctx.target.is_local and not ctx.dry_run:
        check_write_access(ctx)
    check_overlap(ctx, ctx.job.adapter_source, ctx.job.base_source)
    staging = staging_folder(ctx)  # a dir: output that cannot be written fails before any download
    cleanup = Cleanup(ctx, staging)
    try:
        return _stages(ctx, staging, cleanup)
    except BaseException as e:
        cleanup.undo()
        full = full_disk(e) if not isinstance(e, LorashipError) else None
        if full is not None:  # a full disk no stage named: the file's folder, or the run's folder
            folder = Path(os.fsdecode(full.filename)).parent if full.filename else ctx.work
            raise full_disk_error(full, "the run's files", folder, WORKDIR) from e
        raise


def _stages(ctx: RunContext, staging: Path, cleanup: Cleanup) -> RunResult:
    ctx.stage("Resolve")
    resolved = resolve(ctx)
    adapter, key = resolved.adapter, resolved.key
    found = published(ctx, key)  # before anything large is downloaded
    if found is not None:
        return already(ctx, found, key, resolved.labels)
    ctx.stage("Fetch")  # the preflight of disks and memory runs once the base's sizes are known
    streamed = stream_base(ctx, resolved.base_source, resolved.base_state) if ctx.stream else None
    if streamed is not None:  # the weights download during the merge
        base = streamed.base
        ctx.stage("Merge")
        merged = stream_merge(ctx, streamed, adapter, staging, cleanup)
    else:
        base = fetch_base(ctx, resolved.base_source, resolved.base_state)
        ctx.stage("Merge")
        merged = merge_whole(ctx, base, adapter, staging)
    ctx.stage("Verify")
    checked = check(ctx, base, adapter, staging, merged)
    write_card(ctx, base, adapter, staging, checked)
    done = merged_result(ctx.job, base, adapter, key, checked)
    if ctx.dry_run:
        return dry_run_result(done, staging)
    if ctx.target.is_local:
        return written_result(done, move_into_place(ctx, staging))
    return publish(ctx, staging, base, merged, key, done)
