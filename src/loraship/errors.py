"""One error hierarchy for every expected failure.

Each error carries a message that says what failed and where (repo, revision, file, tensor), and
a ``fix`` that says what to do about it. Entry points turn these into a one-line annotation, a
long explanation and an exit code; anything that is not a :class:`LorashipError` is a bug and
keeps its traceback.
"""

from __future__ import annotations

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
