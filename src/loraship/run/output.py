"""Preflight of the output, before anything is downloaded, and what a failed run removes again.

Each takes the run's :class:`~loraship.run.context.RunContext`:

- :func:`check_write_access`: the token may publish the output repo (raises :class:`HubError`).
- :func:`check_overlap`: a ``dir:`` output is neither inside nor around a local input.
- :func:`staging_folder`: returns the folder the merged model is staged in (beside a ``dir:`` output,
  which must be writable, so that :func:`move_into_place` is a rename; in the run's folder otherwise).
- :class:`Cleanup`: on failure, removes the staging folder of a ``dir:`` output, what the run wrote
  into its folder (--workdir), and the empty output repo a streaming run created.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from loraship.engine.merge import current_umask
from loraship.errors import HubError, OutputError
from loraship.run.context import RunContext
from loraship.run.job import Source


def check_write_access(ctx: RunContext) -> None:
    hub = ctx.hub_client()
    identity = hub.whoami()
    repo_id = ctx.target.repo_id or ""
    namespace = repo_id.split("/")[0]
    if not identity.can_write:
        raise HubError(
            f"The token of `{identity.name}` is read-only: it cannot publish `{repo_id}`.",
            fix="Use a token with write access (https://huggingface.co/settings/tokens) in HF_TOKEN or --token.",
        )
    if namespace not in (identity.name, *identity.orgs):
        raise HubError(
            f"`{identity.name}` cannot publish `{repo_id}`: the namespace `{namespace}` is neither this account "
            f"nor one of its organizations ({', '.join(identity.orgs) or 'none'}).",
            fix=f"Publish to `{identity.name}/{repo_id.split('/')[-1]}` (or an organization you belong to), or use "
            f"a token of a member of `{namespace}`.",
        )


def check_overlap(ctx: RunContext, *sources: Source | None) -> None:
    if ctx.target.path is None:
        return
    from loraship.engine.merge import check_overlap

    local = [s.path for s in sources if s is not None and s.path is not None]
    check_overlap(ctx.target.path, local, fix="Choose an `output: dir:...` outside the base and adapter folders.")


def staging_folder(ctx: RunContext) -> Path:
    if ctx.target.is_local:
        assert ctx.target.path is not None
        final = ctx.target.path
        if final.is_dir() and any(final.iterdir()) and not ctx.overwrite and not ctx.dry_run:
            raise OutputError(
                f"The output folder `{final}` exists and is not empty.",
                fix="Pass --overwrite to replace it, or choose another `output: dir:...`.",
            )
        parent = final.resolve().parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            probe = Path(tempfile.mkdtemp(prefix=f".{final.name}.loraship-staging-", dir=parent))
            probe.chmod(0o777 & ~current_umask())
        except OSError as e:
            raise OutputError(
                f"The output folder `{final}` cannot be written: {e.strerror or e}.",
                fix="Choose an `output: dir:...` in a folder you can write to.",
            ) from e
        return probe / "merged"
    return ctx.work / "merged"


def move_into_place(ctx: RunContext, staging: Path) -> Path:
    assert ctx.target.path is not None
    final = ctx.target.path
    try:
        if final.exists():
            trash = staging.parent / "old"
            os.replace(final, trash)
        os.replace(staging, final)
    except OSError as e:
        raise OutputError(f"Cannot move the merged model into `{final}`: {e.strerror or e}.",
                          fix="Check the folder's permissions and run again.") from e  # fmt: skip
    shutil.rmtree(staging.parent, ignore_errors=True)
    return final


class Cleanup:
    """What a failed run leaves nothing of. The merge stage records in :attr:`created` the output repo
    it created empty for a streamed upload; :meth:`undo` runs when any stage raised, and removes what the
    run wrote into its folder (a --workdir keeps only what was there before the run)."""

    def __init__(self, ctx: RunContext, staging: Path) -> None:
        self.ctx, self.staging = ctx, staging
        self.created: str | None = None  # the output repo this run created before verifying (a streaming run)
        self.before = _entries(ctx.work)

    def undo(self) -> None:
        if self.ctx.target.is_local:  # the staging folder sits beside the output: leave nothing there
            shutil.rmtree(self.staging.parent, ignore_errors=True)
        for entry in _entries(self.ctx.work) - self.before:  # the base's files, the staged model
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
        if self.created is not None:  # an empty repo made for the streamed upload: gone again
            self.ctx.hub_client().delete_if_unchanged(self.ctx.target.repo_id or "", self.created)


def _entries(folder: Path) -> set[Path]:
    """What ``folder`` holds at its top level (nothing when it cannot be read)."""
    try:
        return set(folder.iterdir())
    except OSError:
        return set()
