"""Writing the output repo: creating it empty (and deleting it again), uploading blobs ahead of the
commit (:class:`PreUpload`, :meth:`Publishing.upload_blob`), the one commit (or pull request) that
makes it hold exactly the merged folder (:meth:`Publishing.publish`), and its tag.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from loraship.errors import HubError, first_line
from loraship.hub.base import HubBase
from loraship.hub.errors import translate
from loraship.hub.read import Publication, Reads


class PreUpload:
    """Weights uploaded while the merged model is verified (the repo must exist: a new repo would be
    visible before verification passed).

    Nothing is committed here. The files are made read-only first; :meth:`Hub.publish` reuses an
    operation (its sha256, its uploaded blob) only for a file whose size, mtime and inode are still
    those it had then, so the commit names exactly the bytes that verification read; any other file
    is hashed and uploaded again. A failure here is not an error: publish uploads whatever is
    missing; :attr:`problem` says what happened.
    """

    def __init__(self, hub: HubBase, repo_id: str, folder: Path, files: tuple[str, ...], *, create_pr: bool) -> None:
        self.problem: str | None = None
        self.folder = folder
        self.additions: dict[str, Any] = {}
        self._stats = {}
        for f in files:
            (folder / f).chmod(0o444)
            self._stats[f] = file_identity(folder / f)
        self._thread = threading.Thread(target=self._run, args=(hub, repo_id, files, create_pr),
                                        name="loraship-preupload", daemon=True)  # fmt: skip
        self._thread.start()

    def _run(self, hub: HubBase, repo_id: str, files: tuple[str, ...], create_pr: bool) -> None:
        from huggingface_hub import CommitOperationAdd

        try:
            additions = {f: CommitOperationAdd(path_in_repo=f, path_or_fileobj=str(self.folder / f)) for f in files}
            self.additions = additions
            hub.api.preupload_lfs_files(repo_id, list(additions.values()), create_pr=create_pr)
        except Exception as e:  # publish uploads what is missing; the reason is kept for the log
            translated = translate(e, "upload to", repo_id, None, endpoint=hub.endpoint, has_token=bool(hub.token))
            self.problem = translated.message if translated is not None else first_line(e)

    def wait(self) -> dict[str, Any]:
        """When the upload has ended: the operations publish may reuse (files unchanged since)."""
        self._thread.join()
        return {f: op for f, op in self.additions.items() if file_identity(self.folder / f) == self._stats[f]}


def file_identity(path: Path) -> tuple[int, int, int]:
    """Inode, size and modification time: a file is unchanged while they are."""
    st = path.stat()
    return st.st_ino, st.st_size, st.st_mtime_ns


class Publishing(Reads):
    """The Hub's writes to the output repo (part of :class:`~loraship.hub.Hub`; it reads the repo's head)."""

    def create_empty(self, repo_id: str, *, private: bool) -> str | None:
        """Create ``repo_id`` when it does not exist; returns its first commit then (None when it existed)."""
        if self.head(repo_id) is not None:
            return None
        with self._errors("create", repo_id):
            self.api.create_repo(repo_id, private=private, exist_ok=True)
        return self.head(repo_id)

    def delete_if_unchanged(self, repo_id: str, head: str) -> None:
        """Delete a repo this run created, if nothing was committed to it since (best effort)."""
        with contextlib.suppress(Exception):
            if self.head(repo_id) == head:
                self.api.delete_repo(repo_id)

    def preupload(self, repo_id: str, folder: Path, files: Sequence[str], *, create_pr: bool) -> PreUpload:
        """Start uploading ``files`` of ``folder`` to an existing repo in the background, as blobs no
        commit references yet (``preupload_lfs_files``): invisible until :meth:`publish` commits the
        same bytes, which then need no upload. See :class:`PreUpload`."""
        return PreUpload(self, repo_id, folder, tuple(files), create_pr=create_pr)

    def upload_blob(self, repo_id: str, folder: Path, name: str, *, create_pr: bool) -> tuple[Any, bool]:
        """Upload one file of ``folder`` as a blob no commit references yet (``preupload_lfs_files``).

        Returns:
            The operation :meth:`publish` may reuse, and whether the commit can reference the blob
            without the file (an LFS upload; a file the Hub keeps in git goes with the commit itself).

        Raises:
            HubError: The upload failed.
        """
        from huggingface_hub import CommitOperationAdd

        op = CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name))
        with self._errors("upload to", repo_id):
            self.api.preupload_lfs_files(repo_id, [op], create_pr=create_pr)
        return op, bool(getattr(op, "_upload_mode", None) == "lfs" and getattr(op, "_is_uploaded", False))

    def publish(
        self,
        folder: Path,
        repo_id: str,
        *,
        private: bool,
        gated: str | None,
        title: str,
        description: str,
        create_pr: bool,
        tag: str | None,
        parent_commit: str | None,
        reuse: Mapping[str, Any] | None = None,
    ) -> Publication:
        """Create the repo if needed, gate it, make it hold exactly ``folder`` in one commit (or PR), then tag it.

        Raises:
            HubError: The token may not write there, the tag points elsewhere, or the Hub failed.
        """
        with self._errors("create", repo_id):
            self.api.create_repo(repo_id, private=private, exist_ok=True)
        if gated:
            with self._errors("gate", repo_id):
                self.api.update_repo_settings(repo_id, gated=gated)  # type: ignore[arg-type]
        with self._errors("push to", repo_id):
            info = self.api.create_commit(
                repo_id, operations=self._replacing(folder, repo_id, reuse or {}), commit_message=title,
                commit_description=description, create_pr=create_pr,
                parent_commit=parent_commit if not create_pr else None,
            )  # fmt: skip
        sha = str(info.oid)
        if tag:
            self.ensure_tag(repo_id, tag, sha)
        return Publication(repo_url=self.url(repo_id), commit_sha=sha, pr_url=info.pr_url, tag=tag)

    def _replacing(self, folder: Path, repo_id: str, reuse: Mapping[str, Any]) -> list[Any]:
        """Operations that make the repo's default branch hold exactly ``folder``: every file added,
        every other file deleted (but ``.gitattributes``). A stale `model.safetensors` left beside
        new shards would load instead of them.

        One ``create_commit``, never ``upload_folder``: with hf_xet installed, huggingface_hub 2.4's
        ``upload_folder`` streams large folders into several commits ("part 2"...), and a partial
        first commit would carry the provenance title that tells a rerun the model is published.
        """
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete
        from huggingface_hub.hf_api import RepoFile

        # Weight shards uploaded ahead and deleted since (a streaming run) are committed from their operations.
        files = sorted({*(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()), *reuse})
        remote = [e.path for e in self.api.list_repo_tree(repo_id, recursive=True) if isinstance(e, RepoFile)]
        stale = [CommitOperationDelete(path_in_repo=p) for p in remote if p not in files and p != ".gitattributes"]
        added = [reuse.get(f) or CommitOperationAdd(path_in_repo=f, path_or_fileobj=str(folder / f)) for f in files]
        return [*stale, *added]

    def ensure_tag(self, repo_id: str, tag: str, sha: str) -> None:
        """Tag ``sha`` (nothing to do when the tag is already there).

        Raises:
            HubError: The tag exists and points elsewhere.
        """
        with self._errors("tag", repo_id):
            refs = self.api.list_repo_refs(repo_id)
            existing = next((t for t in refs.tags if t.name == tag), None)
            if existing is not None:
                if existing.target_commit == sha:
                    return
                raise HubError(
                    f"Tag `{tag}` of `{repo_id}` already points to commit {existing.target_commit}, not to the new "
                    f"commit {sha}.",
                    fix="Use another --tag, or delete the old tag on the Hub if it is wrong.",
                )
            self.api.create_tag(repo_id, tag=tag, revision=sha)
