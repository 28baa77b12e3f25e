"""huggingface_hub's errors as loraship :class:`~loraship.errors.HubError` messages that name the repo
and say what to do. Every Hub call goes through :meth:`loraship.hub.base.HubBase._errors`, which
uses :func:`translate`; tokens never appear in the messages (only whether one was given).

This module imports no other module of :mod:`loraship.hub` (they all import it).
"""

from __future__ import annotations

import json

from loraship.errors import HubError, known_failure


class CommitConflict(HubError):
    """The output repo's branch moved between reading its head and committing (HTTP 412)."""


def not_understood(action: str, repo_id: str, what: str, *, endpoint: str) -> HubError:
    """The Hub answered ``action`` on ``repo_id`` with a reply of the wrong shape (``what`` says how)."""
    return HubError(
        f"The Hub's answer when trying to {action} `{repo_id}` was not understood: {what}.",
        fix=f"Try again in a while; if it persists, check that HF_ENDPOINT ({endpoint}) points at a Hugging Face "
        "Hub, and https://status.huggingface.co.",
        transient=True,
    )


def translate(
    error: Exception, action: str, repo_id: str | None, revision: str | None, *, endpoint: str, has_token: bool
) -> HubError | None:
    """The HubError for ``error``, raised while trying to ``action`` the repo (None: not a Hub error).

    Args:
        endpoint: The Hub's URL, for the messages.
        has_token: Whether the request carried a token (the token itself never comes here).
    """
    import httpx2 as httpx
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    who = "the given token" if has_token else "an anonymous request (no token given)"
    repo = f"`{repo_id}`" if repo_id else "the Hub"
    target = f"{action} {repo}" if repo_id else action
    url = f"{endpoint}/{repo_id or ''}"
    if isinstance(error, RevisionNotFoundError):
        return HubError(
            f"{repo} has no revision `{revision}`.",
            fix=f"Use a branch, tag or commit of the repo (see {url}/tree/main).",
        )
    if isinstance(error, GatedRepoError):
        return HubError(
            f"{repo} is gated, and {who} has no access to it.",
            fix=f"Request access at {url}, then set HF_TOKEN (or --token) to a token of the "
            "account that was granted access.",
        )
    if isinstance(error, RepositoryNotFoundError):
        return HubError(
            f"{repo} was not found on {endpoint}, or it is private and {who} cannot see it.",
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
        if status is not None and status >= 500:
            said = _first_line(getattr(error, "server_message", None))
            return HubError(
                f"The Hub failed on its side ({status}) when trying to {target}."
                + (f" It said: {said}" if said else ""),
                fix="Nothing in the job is at fault: run again in a while (the bot retries by itself); if it "
                "persists, check https://status.huggingface.co.",
                transient=True,
            )  # fmt: skip
        return HubError(
            f"The Hub answered {status} when trying to {target}.",
            fix="Try again in a while; if it persists, check https://status.huggingface.co.",
            transient=status is None or status == 429,
        )
    if type(error).__name__ == "OfflineModeIsEnabled":  # not the network: the user's setting
        offline = known_failure(error)
        assert isinstance(offline, HubError)
        return offline
    if isinstance(error, (httpx.TransportError, ConnectionError, TimeoutError)):
        return HubError(
            f"Cannot reach the Hub at {endpoint} to {target}: {type(error).__name__}.",
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


def _first_line(message: str | None, limit: int = 120) -> str:
    """The first line of a server's message, cut at ``limit`` characters ('' when it says nothing)."""
    line = (message or "").strip().splitlines()[0].strip() if (message or "").strip() else ""
    return line if len(line) <= limit else line[: limit - 1] + "…"
