"""Everything loraship asks of the Hugging Face Hub, through huggingface_hub (the only module that
calls it). Client errors become :class:`~loraship.errors.HubError` messages that name the repo and
say what to do; tokens never appear in them.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraship import __version__
from loraship.errors import HubError, first_line, known_failure

DEFAULT_ENDPOINT = "https://huggingface.co"


class CommitConflict(HubError):
    """The output repo's branch moved between reading its head and committing (HTTP 412)."""


@dataclass(frozen=True)
class RepoState:
    """A repo pinned to one commit."""

    repo_id: str
    sha: str
    requested: str | None
    private: bool
    gated: str | bool
    files: tuple[str, ...]
    card_data: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.repo_id}@{self.sha}"


@dataclass(frozen=True)
class Identity:
    """Who the token belongs to."""

    name: str
    orgs: tuple[str, ...]
    can_write: bool


@dataclass(frozen=True)
class Publication:
    """A commit (or pull request) of the output repo."""

    repo_url: str
    commit_sha: str | None
    pr_url: str | None = None
    tag: str | None = None

    @property
    def link(self) -> str:
        """Where people see it: the pull request, else the commit."""
        return self.pr_url or f"{self.repo_url}/commit/{self.commit_sha}"


class PreUpload:
    """Weights uploaded while the merged model is verified (the repo must exist: a new repo would be
    visible before verification passed).

    Nothing is committed here. The files are made read-only first; :meth:`Hub.publish` reuses an
    operation (its sha256, its uploaded blob) only for a file whose size, mtime and inode are still
    those it had then, so the commit names exactly the bytes that verification read; any other file
    is hashed and uploaded again. A failure here is not an error: publish uploads whatever is
    missing; :attr:`problem` says what happened.
    """

    def __init__(self, hub: Hub, repo_id: str, folder: Path, files: tuple[str, ...], *, create_pr: bool) -> None:
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

    def _run(self, hub: Hub, repo_id: str, files: tuple[str, ...], create_pr: bool) -> None:
        from huggingface_hub import CommitOperationAdd

        try:
            additions = {f: CommitOperationAdd(path_in_repo=f, path_or_fileobj=str(self.folder / f)) for f in files}
            self.additions = additions
            hub.api.preupload_lfs_files(repo_id, list(additions.values()), create_pr=create_pr)
        except Exception as e:  # publish uploads what is missing; the reason is kept for the log
            self.problem = first_line(e)

    def wait(self) -> dict[str, Any]:
        """When the upload has ended: the operations publish may reuse (files unchanged since)."""
        self._thread.join()
        return {f: op for f, op in self.additions.items() if file_identity(self.folder / f) == self._stats[f]}


def file_identity(path: Path) -> tuple[int, int, int]:
    """Inode, size and modification time: a file is unchanged while they are."""
    st = path.stat()
    return st.st_ino, st.st_size, st.st_mtime_ns


def hub_token() -> str | None:
    """huggingface_hub's own token lookup: a trusted-publishing exchange when ``HF_OIDC_RESOURCE``
    is set, else ``HF_TOKEN``, else the token ``hf auth login`` stored.

    Raises:
        HubError: Trusted publishing is asked for and the exchange fails (never a silent fallback).
    """
    from huggingface_hub import get_token
    from huggingface_hub.errors import HfHubHTTPError, OIDCError

    try:
        return get_token() or None
    except (OIDCError, HfHubHTTPError) as e:
        resource = os.environ.get("HF_OIDC_RESOURCE", "")
        reason = (getattr(e, "server_message", None) or str(e)).strip().splitlines()[0]
        raise HubError(
            f"Trusted publishing failed: the Hub did not exchange this job's OIDC token for a token scoped to "
            f"`{resource}` ({reason.strip().rstrip('.')}).",
            fix=f"On the Hub, add this GitHub repository and workflow as a trusted publisher of `{resource}` (its "
            "Settings, Trusted publishers: https://huggingface.co/docs/hub/trusted-publishers), and give the job "
            "`permissions: id-token: write`; or use an `hf-token` instead.",
        ) from e


class Hub:
    """The Hugging Face Hub, through huggingface_hub's own client.

    Args:
        token: The token; when None, huggingface_hub's own lookup (``HF_TOKEN``, else the token
            ``hf auth login`` stored). Never logged.
        endpoint: The Hub's URL (``HF_ENDPOINT`` when None, else https://huggingface.co).
    """

    def __init__(self, *, token: str | None = None, endpoint: str | None = None) -> None:
        from huggingface_hub import HfApi

        self.token = token if token is not None else hub_token()
        self.endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
        self.api = HfApi(endpoint=self.endpoint, token=self.token or False, library_name="loraship",
                         library_version=__version__)  # fmt: skip

    def url(self, repo_id: str) -> str:
        return f"{self.endpoint}/{repo_id}"

    # -- reading

    def whoami(self) -> Identity:
        """The token's account.

        Raises:
            HubError: No token, or the Hub rejects it.
        """
        if not self.token:
            raise HubError(
                "Publishing to the Hub needs a Hugging Face token, and none was given.",
                fix="Sign in with `hf auth login`, or set HF_TOKEN (or pass --token), with a token that has write "
                "access: https://huggingface.co/settings/tokens.",
            )
        with self._errors("check the token"):
            info = self.api.whoami()
        orgs = tuple(str(o.get("name")) for o in info.get("orgs") or [] if o.get("name"))
        role = ((info.get("auth") or {}).get("accessToken") or {}).get("role")
        return Identity(name=str(info.get("name")), orgs=orgs, can_write=role != "read")

    def repo(self, repo_id: str, revision: str | None = None) -> RepoState:
        """The repo at ``revision`` (default branch when None), pinned to its commit SHA.

        Raises:
            HubError: The repo or revision does not exist, or the token cannot see it.
        """
        with self._errors("read", repo_id, revision):
            info = self.api.model_info(repo_id, revision=revision, files_metadata=False)
        card = info.card_data.to_dict() if info.card_data is not None else {}
        files = tuple(s.rfilename for s in info.siblings or [])
        unsafe = next((f for f in files if f.startswith(("/", "\\")) or ".." in f.replace("\\", "/").split("/")), None)
        if unsafe is not None:
            raise HubError(
                f"`{repo_id}` lists a file named `{unsafe}`, which would lie outside the repo's folder; loraship "
                "does not download from a repo like that.",
                fix="Use a repo whose file names are plain paths inside it.",
            )
        gated = info.gated if info.gated is not None else False
        return RepoState(repo_id=repo_id, sha=str(info.sha), requested=revision, private=bool(info.private),
                         gated=gated, files=files, card_data=card)  # fmt: skip

    def file_sizes(self, repo: RepoState) -> dict[str, int]:
        """Each file's size at the pinned SHA, from the Hub's file listing (no download).

        Raises:
            HubError: The listing failed.
        """
        with self._errors("list the files of", repo.repo_id, repo.sha):
            entries = list(self.api.list_repo_tree(repo.repo_id, revision=repo.sha, recursive=True))
        return {e.path: int(getattr(e, "size", 0) or 0) for e in entries if getattr(e, "size", None) is not None}

    def missing_from_cache(self, repo: RepoState, files: Sequence[str]) -> list[str]:
        """The files the Hugging Face cache does not hold yet at the pinned SHA (what a fetch downloads)."""
        from huggingface_hub import try_to_load_from_cache

        return [f for f in files if not isinstance(try_to_load_from_cache(repo.repo_id, f, revision=repo.sha), str)]

    def fetch(self, repo: RepoState, files: Sequence[str]) -> Path:
        """Download ``files`` of the repo at its pinned SHA (into the Hugging Face cache).

        Raises:
            HubError: Access denied (gated, private) or a download failed.
        """
        from huggingface_hub import snapshot_download

        with self._errors("download", repo.repo_id, repo.sha):
            path = snapshot_download(repo.repo_id, revision=repo.sha, allow_patterns=list(files),
                                     token=self.token or False, endpoint=self.endpoint)  # fmt: skip
        return Path(path)

    def header(self, repo: RepoState, filename: str) -> bytes:
        """The first bytes of a safetensors file, up to the end of its header (ranged reads, as
        huggingface_hub's ``get_safetensors_metadata`` does, but keeping the exact bytes: the data's
        offsets start after them).

        Raises:
            HubError: The read failed, or the file is not safetensors.
        """
        import struct

        from huggingface_hub import get_session, hf_hub_url, hf_raise_for_status
        from huggingface_hub.utils import build_hf_headers  # type: ignore[attr-defined]

        url = hf_hub_url(repo.repo_id, filename, revision=repo.sha, endpoint=self.endpoint)
        headers = build_hf_headers(token=self.token or False, library_name="loraship", library_version=__version__)
        with self._errors("read the weights of", repo.repo_id, repo.sha):
            first = get_session().get(url, headers={**headers, "range": "bytes=0-100000"})
            hf_raise_for_status(first)
            data = first.content
            if len(data) < 8:
                raise HubError(f"`{filename}` of `{repo}` is not a safetensors file.", fix="Check the base repo.")
            (size,) = struct.unpack("<Q", data[:8])
            if size > 100_000_000:
                raise HubError(f"`{filename}` of `{repo}` has a {size}-byte header: not a safetensors file.",
                               fix="Check the base repo.")  # fmt: skip
            if len(data) < 8 + size:
                rest = get_session().get(url, headers={**headers, "range": f"bytes={len(data)}-{size + 7}"})
                hf_raise_for_status(rest)
                data += rest.content
        return data[: 8 + size]

    def download(self, repo: RepoState, filename: str, folder: Path) -> Path:
        """Download one file of the repo at its pinned SHA into ``folder`` (not the cache); returns its path.

        Raises:
            HubError: Access denied or the download failed.
        """
        from huggingface_hub import hf_hub_download

        with self._errors("download", repo.repo_id, repo.sha):
            path = hf_hub_download(repo.repo_id, filename, revision=repo.sha, local_dir=folder,
                                   token=self.token or False, endpoint=self.endpoint)  # fmt: skip
        return Path(path)

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

    def find_publication(self, repo_id: str, key: str) -> Publication | None:
        """A commit on the default branch, or an open pull request, whose title carries ``key``."""
        from huggingface_hub.errors import RepositoryNotFoundError

        with self._errors("read", repo_id):
            try:
                commits = self.api.list_repo_commits(repo_id)
            except RepositoryNotFoundError:
                return None
            for commit in commits:
                if key in commit.title or key in commit.message:
                    return Publication(repo_url=self.url(repo_id), commit_sha=commit.commit_id)
            for pr in self.api.get_repo_discussions(repo_id, discussion_type="pull_request", discussion_status="open"):
                if key in pr.title:
                    return Publication(repo_url=self.url(repo_id), commit_sha=None, pr_url=pr.url)
        return None

    def head(self, repo_id: str) -> str | None:
        """The default branch's commit SHA, or None when the repo does not exist."""
        from huggingface_hub.errors import RepositoryNotFoundError

        with self._errors("read", repo_id):
            try:
                return str(self.api.model_info(repo_id).sha)
            except RepositoryNotFoundError:
                return None

    # -- writing

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

    def comment(self, repo_id: str, title: str, body: str) -> str:
        """Comment on the repo's discussion called ``title`` (opened if missing); returns its URL."""
        with self._errors("comment on", repo_id):
            for discussion in self.api.get_repo_discussions(repo_id, discussion_type="discussion"):
                if discussion.title == title and discussion.status == "open":
                    self.api.comment_discussion(repo_id, discussion.num, body)
                    return str(discussion.url)
            created = self.api.create_discussion(repo_id, title=title, description=body)
            return str(created.url)

    def run_job(
        self, *, image: str, command: list[str], env: dict[str, str], flavor: str, timeout: str, namespace: str | None
    ) -> tuple[str, str]:
        """Start a Hugging Face Job (the token goes in as a secret); returns its id and URL."""
        with self._errors("start a Hugging Face Job"):
            job = self.api.run_job(image=image, command=command, env=env, secrets={"HF_TOKEN": self.token or ""},
                                   flavor=flavor, timeout=timeout, namespace=namespace)  # fmt: skip
        return str(job.id), str(job.url)

    # -- errors

    @contextlib.contextmanager
    def _errors(self, action: str, repo_id: str | None = None, revision: str | None = None) -> Iterator[None]:
        try:
            yield
        except HubError:
            raise
        except Exception as e:
            translated = self._translate(e, action, repo_id, revision)
            if translated is None:
                raise
            raise translated from e

    def _translate(self, error: Exception, action: str, repo_id: str | None, revision: str | None) -> HubError | None:
        import httpx2 as httpx
        from huggingface_hub.errors import (
            GatedRepoError,
            HfHubHTTPError,
            RemoteEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        who = "the given token" if self.token else "an anonymous request (no token given)"
        repo = f"`{repo_id}`" if repo_id else "the Hub"
        target = f"{action} {repo}" if repo_id else action
        if isinstance(error, RevisionNotFoundError):
            return HubError(
                f"{repo} has no revision `{revision}`.",
                fix=f"Use a branch, tag or commit of the repo (see {self.url(repo_id or '')}/tree/main).",
            )
        if isinstance(error, GatedRepoError):
            return HubError(
                f"{repo} is gated, and {who} has no access to it.",
                fix=f"Request access at {self.url(repo_id or '')}, then set HF_TOKEN (or --token) to a token of the "
                "account that was granted access.",
            )
        if isinstance(error, RepositoryNotFoundError):
            return HubError(
                f"{repo} was not found on {self.endpoint}, or it is private and {who} cannot see it.",
                fix="Check the repo id. For a private repo, set HF_TOKEN (or --token) to a token that can read it.",
            )
        if isinstance(error, RemoteEntryNotFoundError):
            return HubError(f"A file is missing from {repo} at `{revision}`.", fix="Check the repo's files.")
        if isinstance(error, HfHubHTTPError):
            status = error.response.status_code if error.response is not None else None
            if status == 401:
                return HubError(
                    f"The Hub rejected the token while trying to {target} (401: invalid or expired token).",
                    fix="Create a token at https://huggingface.co/settings/tokens and set HF_TOKEN (or --token).",
                )
            if status == 403:
                return HubError(
                    f"The token's account may not {target} (403 Forbidden).",
                    fix="Use a token with write access to that namespace, or publish to a repo in your own namespace.",
                )
            if status == 412:
                return CommitConflict(
                    f"{repo} got another commit while loraship was pushing to it (412 Precondition Failed).",
                    fix="Run again: loraship checks whether that commit already holds this merge before pushing.",
                    transient=True,
                )
            return HubError(
                f"The Hub answered {status} when trying to {target}.",
                fix="Try again in a while; if it persists, check https://status.huggingface.co.",
                transient=status is None or status >= 500 or status == 429,
            )
        if type(error).__name__ == "OfflineModeIsEnabled":  # not the network: the user's setting
            offline = known_failure(error)
            assert isinstance(offline, HubError)
            return offline
        if isinstance(error, (httpx.TransportError, ConnectionError, TimeoutError)):
            return HubError(
                f"Cannot reach the Hub at {self.endpoint} to {target}: {type(error).__name__}.",
                fix="Check the network (and HF_ENDPOINT), then run again.",
                transient=True,
            )
        if isinstance(error, json.JSONDecodeError):
            return HubError(
                f"The Hub sent a reply that is not JSON when trying to {target}.",
                fix="Try again in a while; if it persists, check https://status.huggingface.co.",
                transient=True,
            )
        return None
