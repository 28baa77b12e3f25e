"""Downloading a repo's files at its pinned commit: into the Hugging Face cache (:meth:`Downloads.fetch`,
with :meth:`Downloads.missing_from_cache` saying what that would download) or into a folder
(:meth:`Downloads.download`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from loraship.hub.base import HubBase
from loraship.hub.read import RepoState


class Downloads(HubBase):
    """The Hub's downloads (part of :class:`~loraship.hub.Hub`)."""

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
