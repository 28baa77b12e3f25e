"""Reading the Hub without downloading files: the token's account, a repo pinned to a commit
(:class:`RepoState`), file sizes, a safetensors header, the default branch's head, and an earlier
:class:`Publication` of the same merge.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from loraship import __version__
from loraship.errors import HubError
from loraship.hub.base import HubBase
from loraship.hub.errors import not_understood

#: A commit SHA as the Hub sends it (git's SHA-1 object names, lowercase hex).
_SHA = re.compile(r"[0-9a-f]{40}")


class _Missing(Exception):
    """The repo does not exist (for ``head``)."""


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


class Reads(HubBase):
    """The Hub's reads (part of :class:`~loraship.hub.Hub`)."""

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
        info = self._model_info(repo_id, revision)
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

    def _model_info(self, repo_id: str, revision: str | None, *, missing_ok: bool = False) -> Any:
        """huggingface_hub's ``ModelInfo`` of the repo at ``revision``, its ``id`` and ``sha`` checked.

        Raises:
            HubError: The read failed, or the Hub's reply lacks a field (or has one of the wrong type).
            _Missing: ``missing_ok`` and the repo does not exist.
        """
        from huggingface_hub.errors import RepositoryNotFoundError

        with self._errors("read", repo_id, revision):
            try:
                info = self.api.model_info(repo_id, revision=revision, files_metadata=False)
            except RepositoryNotFoundError:
                if missing_ok:
                    raise _Missing from None
                raise
            except KeyError as e:  # huggingface_hub's ModelInfo pops its required fields
                raise not_understood("read", repo_id, f"it has no `{e.args[0]}`", endpoint=self.endpoint) from e
            except (TypeError, AttributeError) as e:
                raise not_understood("read", repo_id, "a field has the wrong type", endpoint=self.endpoint) from e
        sha = info.sha
        if not isinstance(sha, str) or not _SHA.fullmatch(sha):
            what = "it has no `sha`" if sha is None else f"its `sha` {str(sha)[:60]!r} is not a commit SHA"
            raise not_understood("read", repo_id, what, endpoint=self.endpoint)
        return info

    def file_sizes(self, repo: RepoState) -> dict[str, int]:
        """Each file's size at the pinned SHA, from the Hub's file listing (no download).

        Raises:
            HubError: The listing failed.
        """
        with self._errors("list the files of", repo.repo_id, repo.sha):
            entries = list(self.api.list_repo_tree(repo.repo_id, revision=repo.sha, recursive=True))
        return {e.path: int(getattr(e, "size", 0) or 0) for e in entries if getattr(e, "size", None) is not None}

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
        try:
            return str(self._model_info(repo_id, None, missing_ok=True).sha)
        except _Missing:
            return None
