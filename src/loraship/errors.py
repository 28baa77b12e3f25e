"""One error hierarchy for every expected failure.

Each error carries a message that says what failed and where (repo, revision, file, tensor), and
a ``fix`` that says what to do about it. Entry points turn these into a one-line annotation, a
long explanation and an exit code; anything that is not a :class:`LorashipError` is a bug and
keeps its traceback.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar


class LorashipError(Exception):
    """An expected failure, with a message that says what, where, and how to fix it.

    Args:
        message: What failed, naming the file, tensor, repo or revision involved.
        fix: What the user can do about it, as one or more sentences.
        transient: Trying again later may succeed (the Hub was down, the network failed).
    """

    exit_code: ClassVar[int] = 1
    title: ClassVar[str] = "loraship failed"

    def __init__(self, message: str, *, fix: str | None = None, transient: bool = False) -> None:
        self.message = message
        self.fix = fix
        self.transient = transient
        super().__init__(str(self))

    def __str__(self) -> str:
        if self.fix:
            return f"{self.message}\nFix: {self.fix}"
        return self.message


class InputError(LorashipError):
    """A command-line argument, folder or file given by the user is unusable."""

    title = "Bad input"


class UsageError(InputError):
    """The command line itself is wrong (an unknown flag, a missing or out-of-range value, an output path
    that cannot be written): found before any work, exit code 2 as argparse's usage errors."""

    exit_code = 2
    title = "Bad command line"


class AdapterError(LorashipError):
    """The adapter folder is missing something or is not a PEFT adapter."""

    title = "Bad adapter"


class BaseModelError(LorashipError):
    """The base model folder is missing something or cannot be merged into."""

    title = "Bad base model"


class IncompatibleError(LorashipError):
    """The adapter does not fit the base model (names, shapes, architecture)."""

    title = "Adapter does not fit the base model"


class UnsupportedError(LorashipError):
    """The adapter uses a feature loraship cannot merge (correctly) yet."""

    title = "Unsupported adapter"


class CorruptFileError(LorashipError):
    """A weights file is truncated or malformed."""

    title = "Corrupt weights file"


class OutputError(LorashipError):
    """The output location cannot be written as asked."""

    title = "Cannot write the output"


class ResourceError(LorashipError):
    """The machine lacks the disk space or memory the run needs (found before downloading, or a disk that
    filled up during the run)."""

    title = "Not enough room on this machine"


class VerificationFailed(LorashipError):
    """The merged model does not behave like base + adapter. ``report`` holds the VerifyReport."""

    title = "Verification failed"
    report: Any = None


class ConfigError(LorashipError):
    """A job configuration file (loraship.yaml, bot.yaml) is invalid.

    ``file`` and ``line``: where (the first problem), for editors and GitHub's annotations.
    """

    title = "Invalid configuration"

    def __init__(self, message: str, *, fix: str | None = None, file: Path | None = None, line: int | None = None):
        self.file = file
        self.line = line
        super().__init__(message, fix=fix)


class HubError(LorashipError):
    """A Hugging Face Hub request failed in a way the user can act on."""

    title = "Hugging Face Hub error"


class GitHubError(LorashipError):
    """A GitHub API request failed in a way the user can act on."""

    title = "GitHub error"


def first_line(error: BaseException) -> str:
    """An exception's first line of text for a message (its type's name when it has none)."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


#: Exit code of a bug (sysexits' EX_SOFTWARE): not 1 (a known failure) nor 2 (a usage error).
BUG_EXIT_CODE = 70


class NetworkError(HubError):
    """The network failed (no connection, DNS, timeout, offline mode): known, and worth retrying."""

    title = "Network error"


def known_failure(error: BaseException) -> LorashipError | None:
    """A failure that is not a bug although it is not a :class:`LorashipError`: the network (a
    connection refused or dropped, DNS, a timeout, huggingface_hub's offline mode, the xet uploader's
    ``ConnectionError``), said with the host and what to do. None for anything else."""
    import socket

    seen: BaseException | None = error
    chain: list[BaseException] = []
    while seen is not None and seen not in chain:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    for e in chain:
        kind = type(e).__name__
        module = type(e).__module__
        if kind == "OfflineModeIsEnabled" or (kind == "LocalEntryNotFoundError" and os.environ.get("HF_HUB_OFFLINE")):
            return NetworkError(
                "The Hugging Face Hub is not reachable: HF_HUB_OFFLINE is set, and the files are not in the local "
                "cache.",
                fix="Unset HF_HUB_OFFLINE (or set it to 0) to download, or pass local folders instead of repo ids.",
                transient=False,
            )
        network = isinstance(e, (ConnectionError, TimeoutError, socket.gaierror)) or (
            module.split(".")[0] in ("requests", "httpx", "httpcore", "httpx2", "httpcore2", "h11", "urllib3")
            and any(word in kind for word in ("Connect", "Timeout", "Network", "Protocol", "ReadError", "Transport"))
        )
        if network:
            host = _host_of(e)
            return NetworkError(
                f"Cannot reach {host}: {kind}" + (f" ({_first(e)})" if _first(e) else "") + ".",
                fix="Check the network connection, proxy settings and HF_ENDPOINT, then run again (network failures "
                "are retried by the bot).",
                transient=True,
            )
    return None


def _host_of(error: BaseException) -> str:
    from urllib.parse import urlsplit

    try:
        request = getattr(error, "request", None)  # httpx raises RuntimeError for an error without a request
    except RuntimeError:
        request = None
    url = getattr(request, "url", None) if request is not None else None
    try:
        netloc = urlsplit(str(url)).netloc if url else ""
    except ValueError:
        netloc = ""
    return f"`{netloc}`" if netloc else "the network"


def _first(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:200] if text else ""


def versions() -> str:
    """``loraship 0.1.0, torch 2.13.0, …`` for bug reports."""
    from importlib.metadata import PackageNotFoundError, version

    parts = []
    for name in ("loraship", "torch", "transformers", "peft", "huggingface_hub", "safetensors"):
        try:
            parts.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            parts.append(f"{name} (not installed)")
    import platform

    return ", ".join(parts) + f", Python {platform.python_version()}"
