"""Writing merged shards on a background thread, in order, with bounded bytes in flight.

Torch-free on purpose: the merge starts copying untouched tensors while torch is still importing.
"""

from __future__ import annotations

import functools
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from loraship.engine.safetensors_io import ShardWriter, tensor_bytes

if TYPE_CHECKING:
    import torch

#: At most this many bytes are computed but not yet written.
IN_FLIGHT_BYTES = 64 << 20


@dataclass(frozen=True)
class CopyChunk:
    """Bytes to copy undecoded from a base file."""

    fd: int
    offset: int
    length: int


@dataclass(frozen=True)
class DataChunk:
    """Computed bytes to write; ``release`` hands the read buffer back once they are written."""

    tensor: torch.Tensor
    release: Callable[[], None] | None = None


Chunk = CopyChunk | DataChunk


class OrderedWriter:
    """Writes on one background thread, in submission order, with bounded bytes in flight.

    ``submit`` waits while more than ``max_bytes`` submitted bytes are not written yet. An error on
    the writer thread (or in a compute worker whose result it writes) is raised again by the next
    ``submit`` or by ``drain``.
    """

    def __init__(self, max_bytes: int = IN_FLIGHT_BYTES) -> None:
        self._queue: queue.SimpleQueue[tuple[Callable[[], object], int] | None] = queue.SimpleQueue()
        self._cond = threading.Condition()
        self._in_flight = 0
        self._max = max_bytes
        self._error: BaseException | None = None
        self._cleanup: list[Callable[[], None]] = []
        self._thread = threading.Thread(target=self._run, name="loraship-writer", daemon=True)
        self._thread.start()

    def reserve(self, nbytes: int) -> None:
        """Wait until ``nbytes`` more may be in flight; raise the writer's error if any."""
        with self._cond:
            while self._error is None and self._in_flight and self._in_flight + nbytes > self._max:
                self._cond.wait()
            if self._error is not None:
                raise self._error
            self._in_flight += nbytes

    def submit(self, fn: Callable[[], object], *, reserved: int = 0) -> None:
        """Run ``fn`` on the writer thread after everything submitted before; ``reserved`` bytes
        (from :meth:`reserve`) are released when it has run."""
        self._queue.put((fn, reserved))

    def write_chunks(self, shard: ShardWriter, work: Future[list[Chunk]] | list[Chunk], nbytes: int) -> None:
        """Write ``work``'s chunks to ``shard`` when their turn comes (waiting for a worker if needed)."""
        self.reserve(nbytes)
        self.submit(functools.partial(_write_chunks, shard, work), reserved=nbytes)

    def on_error(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` if the writing fails or is abandoned (e.g. close a half-written file)."""
        self._cleanup.append(fn)

    def drain(self) -> None:
        """Wait until everything submitted is written; raise the writer's error if any."""
        done = threading.Event()
        self._queue.put((done.set, 0))
        while not done.wait(0.05):
            if self._error is not None:
                break
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            fn, nbytes = item
            try:
                if self._error is None:
                    fn()
            except BaseException as e:  # handed to the submitting thread
                with self._cond:
                    self._error = e
            finally:
                with self._cond:
                    self._in_flight -= nbytes
                    self._cond.notify_all()

    def __enter__(self) -> OrderedWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            with self._cond:  # stop writing what is still queued
                self._error = self._error or RuntimeError("merge abandoned")
                self._cond.notify_all()
        self._queue.put(None)
        self._thread.join()
        if exc_type is not None or self._error is not None:
            for fn in self._cleanup:
                fn()


def _write_chunks(shard: ShardWriter, work: Future[list[Chunk]] | list[Chunk]) -> None:
    chunks = work.result() if isinstance(work, Future) else work
    try:
        for chunk in chunks:
            if isinstance(chunk, CopyChunk):
                shard.copy_from(chunk.fd, chunk.offset, chunk.length)
            else:
                shard.write(tensor_bytes(chunk.tensor))
    finally:
        for chunk in chunks:
            if isinstance(chunk, DataChunk) and chunk.release is not None:
                chunk.release()


def existing_ancestor(path: Path) -> Path:
    """``path`` (resolved), or its nearest parent that exists: where a folder still to be made will live."""
    path = path.resolve()
    while not path.exists():
        path = path.parent
    return path
