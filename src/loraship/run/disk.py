"""A disk that fills up during a run (``ENOSPC``, a quota, ``ulimit -f``): a known failure, not a bug.

The preflight (:mod:`.preflight`) refuses a run that cannot fit before anything is downloaded; the disk
can still fill afterwards (another process, a quota, a file size limit). :func:`room` turns such an
``OSError`` into a :class:`ResourceError` that names the folder, its free space and the setting that
moves it; any other ``OSError`` passes through unchanged.
"""

from __future__ import annotations

import contextlib
import errno
import shutil
from collections.abc import Iterator
from pathlib import Path

from loraship.engine.writer import existing_ancestor
from loraship.errors import ResourceError
from loraship.text import human_bytes

#: The errors of a full disk: no space, the quota exceeded, the file size limit (``ulimit -f``).
FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
#: What moves the Hugging Face cache, and the run's folder, to another disk.
CACHE = "move the Hugging Face cache to a disk with more room (HF_HOME, or HF_HUB_CACHE)"
WORKDIR = "put the run's folder on a disk with more room (--workdir)"


def full_disk(error: BaseException) -> OSError | None:
    """The ``OSError`` of a full disk in ``error``'s chain (its causes and contexts), or None."""
    seen: BaseException | None = error
    chain: list[BaseException] = []
    while seen is not None and seen not in chain:
        if isinstance(seen, OSError) and seen.errno in FULL:
            return seen
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    return None


def full_disk_error(error: OSError, what: str, folder: Path, setting: str) -> ResourceError:
    """The known failure of ``error`` (a full disk) while writing ``what`` into ``folder``."""
    try:
        free = human_bytes(shutil.disk_usage(existing_ancestor(folder)).free)
    except OSError:
        free = "an unknown amount of space"
    reason = error.strerror or errno.errorcode.get(error.errno or 0, str(error))
    return ResourceError(
        f"Writing {what} into `{folder}` failed: {reason}; its disk has {free} free. Nothing was published.",
        fix=f"Free space there (or raise the quota or the file size limit, `ulimit -f`), or {setting}, then run again.",
    )


@contextlib.contextmanager
def room(what: str, folder: Path, setting: str) -> Iterator[None]:
    """A full disk inside becomes a :class:`ResourceError` about ``folder``; other errors pass through.

    Raises:
        ResourceError: The disk of ``folder`` filled up (or a quota or the file size limit was reached).
    """
    try:
        yield
    except ResourceError:
        raise
    except Exception as e:
        full = full_disk(e)
        if full is None:
            raise
        raise full_disk_error(full, what, folder, setting) from e
