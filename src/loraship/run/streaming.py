"""Hub to Hub one shard at a time: download, merge, check and upload overlap; one commit at the end.

- :func:`remote_base` makes a base folder from the Hub without its weights: the small files, and
  for each weight file a placeholder holding the file's real header (read with ranged requests, as
  huggingface_hub's ``get_safetensors_metadata`` reads it) and a hole where the data goes, so the
  merge is planned from that folder exactly as from the whole one.
- :class:`BaseFeed` downloads the weight files in the order the merge reads them, a few ahead, each
  moved over its placeholder when complete (its header checked against the placeholder's), and
  deletes each once the merge and its check are done with it. Every reader of the base opens a file
  only through :meth:`BaseFeed.gate`, which waits for its download: no read can see a placeholder,
  whatever the plan's dependencies between shards are.
- :class:`ShardStream` (the merge's :class:`~loraship.engine.merge.ShardHooks`) takes each finished output
  shard: makes it read-only, checks every tensor in it bit for bit against base + adapter (the
  weight check of ``loraship verify``, with a reader of its own), uploads it as a blob that no
  commit references yet (``preupload_lfs_files``), then deletes it. The merge writes the next shard
  while one is on its way and waits before a third, so the disk holds a few shards whatever the
  model's size.

Nothing is visible on the Hub until the run's single commit, which references the uploaded blobs by
the sha256 of the bytes that were checked (the file is read-only from before its check until it is
deleted, and its inode, size and mtime are compared before its upload is trusted).
"""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraship.engine.merge import PreparedMerge, input_files
from loraship.engine.plan import TensorPlan
from loraship.engine.safetensors_io import Checkpoint, TensorInfo, TensorReader, read_header
from loraship.errors import HubError, LorashipError
from loraship.hub.client import Hub, RepoState, file_identity
from loraship.run.disk import CACHE, WORKDIR, room

if TYPE_CHECKING:
    from loraship.check.verify import WeightReport

#: Base weight files on disk at once: the one being merged and checked, and the next one downloading (one
#: more only while a check lags behind the merge).
BASE_WINDOW = 2
#: Output shards on disk at once: the one being written and the one being checked and uploaded; the
#: merge waits before a third.
OUTPUT_WINDOW = 2


class StreamStopped(Exception):
    """The stream stopped early because a shard failed its check (the run reports the check)."""


def remote_base(hub: Hub, state: RepoState, files: Iterable[str], sizes: Mapping[str, int], folder: Path) -> list[str]:
    """Fill ``folder`` with the base's small files and a placeholder per top-level safetensors file;
    returns the weight files' names.

    Raises:
        HubError: A download or a header read failed, or the Hub's listing has no size for a weight file.
    """
    files = list(files)
    weights = [f for f in files if f.endswith(".safetensors") and "/" not in f]
    others = [f for f in files if f not in weights]
    snapshot = folder
    if others:
        from huggingface_hub import constants

        with room("the base's files", Path(constants.HF_HUB_CACHE), CACHE):
            snapshot = hub.fetch(state, others)
    with room("the base's small files and weight headers", folder, WORKDIR):
        folder.mkdir(parents=True, exist_ok=True)
        for name in others:
            src = snapshot / name
            if src.is_file():
                (folder / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, folder / name)
        for name in weights:
            if not sizes.get(name):
                raise HubError(f"The Hub's file listing of `{state}` gives no size for `{name}`.",
                               fix="Run again; if it persists, run with `--no-stream`.")  # fmt: skip
            header = hub.header(state, name)
            with (folder / name).open("wb") as f:  # sparse: the header, then a hole as long as the data
                f.write(header)
                f.truncate(sizes[name])
    return weights


class BaseFeed:
    """Downloads the base's weight files in ``order``, at most ``window`` on disk (one more when a
    reader waits for it), each moved over its placeholder in ``folder`` when complete."""

    def __init__(self, hub: Hub, state: RepoState, folder: Path, order: list[str], *, window: int = BASE_WINDOW):
        self.hub, self.state, self.folder, self.order, self.window = hub, state, folder, order, window
        self.downloads = folder.parent / f"{folder.name}-downloads"
        self._cond = threading.Condition()
        self._present: set[str] = set()
        self._released: set[str] = set()
        self._wanted: set[str] = set()
        self._error: BaseException | None = None
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="loraship-download", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for name in self.order:
            with self._cond:
                while (
                    not self._stop
                    and name not in self._wanted
                    and len(self._present - self._released) >= self.window  # so at most `window` on disk
                ):
                    self._cond.wait()
                if self._stop:
                    return
            try:
                self._download(name)
            except BaseException as e:  # handed to the reader that waits for this file
                with self._cond:
                    self._error = e
                    self._cond.notify_all()
                return
            with self._cond:
                self._present.add(name)
                self._cond.notify_all()

    def _download(self, name: str) -> None:
        target = self.folder / name
        with target.open("rb") as f:
            prefix = f.read(8)
            expected = prefix + f.read(int.from_bytes(prefix, "little"))
        with room(f"the base's `{name}`", self.downloads, WORKDIR):
            path = self.hub.download(self.state, name, self.downloads)
        with path.open("rb") as f:
            found = f.read(len(expected))
        if found != expected or path.stat().st_size != target.stat().st_size:
            raise HubError(f"`{name}` of `{self.state}` downloaded differently from the header read before the merge.",
                           fix="Run again; if it persists, run with `--no-stream`.")  # fmt: skip
        os.replace(path, target)

    def gate(self, path: Path) -> None:
        """Block until ``path`` is downloaded, if it is one of this feed's files (a reader's gate).

        Raises:
            HubError: Its download failed.
            RuntimeError: It was deleted already (a bug: the run's plan of who reads what was wrong).
        """
        if path.parent != self.folder or path.name not in self.order:
            return
        name = path.name
        with self._cond:
            if name in self._released:
                raise RuntimeError(f"the streaming run deleted the base file {name} before the merge was done with it")
            self._wanted.add(name)
            self._cond.notify_all()
            while name not in self._present:
                if self._error is not None:
                    raise self._error
                if self._stop:
                    raise RuntimeError("the base's downloads were stopped")
                self._cond.wait()

    def release(self, name: str) -> None:
        """Delete a weight file nothing reads any more; the next download may start."""
        with contextlib.suppress(FileNotFoundError):
            (self.folder / name).unlink()
        with self._cond:
            self._released.add(name)
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout=1)
        shutil.rmtree(self.downloads, ignore_errors=True)


@dataclass
class StreamResult:
    """What the stream checked and uploaded."""

    weights: list[WeightReport] = field(default_factory=list)
    library: list[str] = field(default_factory=list)
    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    shards: int = 0
    uploads: dict[str, Any] = field(default_factory=dict)
    identities: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    upload_problem: str | None = None


class ShardStream:
    """Check, upload and delete each output shard as the merge finishes it; see the module docstring.

    Args:
        layout: The merge's output shards (:func:`loraship.engine.merge.shard_layout`).
        feed: The base's downloads (None for a base already on disk: nothing of it is deleted then).
        check: Check each shard's weights here (off when the whole model is verified afterwards, or
            when the job turns verification off).
        upload: ``(hub, repo_id, create_pr)`` to upload the shards to, or None.
        keep: Keep the shards and the base on disk (the output check reads both whole models); an
            upload that fails is then left to the commit.
    """

    def __init__(
        self,
        prepared: PreparedMerge,
        layout: Mapping[str, list[TensorPlan]],
        feed: BaseFeed | None,
        *,
        check: bool,
        upload: tuple[Hub, str, bool] | None,
        keep: bool,
    ) -> None:
        self.prepared, self.feed, self.check, self.upload, self.keep = prepared, feed, check, upload, keep
        self.result = StreamResult()
        by_name = {t.name: t for t in prepared.plan.tensors}
        self._last_use: dict[Path, int] = {}
        self._index = {name: i for i, name in enumerate(layout)}
        for i, tensors in enumerate(layout.values()):
            for t in tensors:
                for path in input_files(t, by_name):
                    self._last_use[path] = i
        self._merge_reader: TensorReader | None = None
        self._check_reader = TensorReader(gate=feed.gate if feed is not None else None)
        self._streamer: Any = None
        self._cond = threading.Condition()
        self._on_disk = 0
        self._error: BaseException | None = None
        self._checks: queue.Queue[tuple[str, Path, tuple[TensorPlan, ...]] | None] = queue.Queue()
        self._uploads: queue.Queue[tuple[str, Path, tuple[int, int, int]] | None] = queue.Queue()
        self._threads = [
            threading.Thread(target=self._guard, args=(self._check_loop,), name="loraship-check", daemon=True),
            threading.Thread(target=self._guard, args=(self._upload_loop,), name="loraship-upload", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    # -- the merge's hooks

    def start(self, reader: TensorReader) -> None:
        self._merge_reader = reader
        if self.feed is not None:
            reader.gate = self.feed.gate

    def before(self, shard: str, inputs: frozenset[Path]) -> None:
        with self._cond:  # a shard counts from its first byte until it is deleted
            while not self.keep and self._on_disk >= OUTPUT_WINDOW and self._error is None:
                self._cond.wait()
            self._raise_if_stopped()
            self._on_disk += 1
        if self.feed is not None:  # fetch what the shard reads first (the readers' gate would wait anyway)
            for path in sorted(inputs):
                self.feed.gate(path)

    def after(self, shard: str, path: Path, tensors: tuple[TensorPlan, ...]) -> None:
        self._checks.put((shard, path, tensors))

    def finish(self) -> None:
        """Wait until every shard is checked and uploaded.

        Raises:
            StreamStopped: A shard failed its check (``result`` holds the reports so far).
            LorashipError: Reading a shard or (keeping nothing on disk) uploading one failed.
        """
        self._checks.put(None)
        for thread in self._threads:
            thread.join()
        self._check_reader.close()
        if self._streamer is not None:
            self._streamer.close()
        with self._cond:
            self._raise_if_stopped()

    def close(self) -> None:
        """Stop the threads after a failure elsewhere (idempotent)."""
        with self._cond:
            if self._error is None:
                self._error = StreamStopped("stopped")
            self._cond.notify_all()
        self._checks.put(None)
        for thread in self._threads:
            thread.join(timeout=5)
        self._check_reader.close()

    # -- the threads

    def _raise_if_stopped(self) -> None:
        if self._error is not None:
            raise self._error

    def _guard(self, loop: Any) -> None:
        try:
            loop()
        except BaseException as e:
            with self._cond:
                self._error = self._error or e
                self._cond.notify_all()
            self._uploads.put(None)

    def _check_loop(self) -> None:
        while (item := self._checks.get()) is not None:
            if self._error is not None:
                break
            shard, path, tensors = item
            path.chmod(0o444)  # the bytes checked now are the bytes uploaded and committed
            identity = file_identity(path)
            _, found = read_header(path)
            self.result.tensors.update(found)
            self.result.shards += 1
            if self.check:
                self._check_shard(shard, path, tensors, found)
            self._release_inputs(self._index[shard])
            self._uploads.put((shard, path, identity))
        self._uploads.put(None)

    def _check_shard(
        self, shard: str, path: Path, tensors: tuple[TensorPlan, ...], found: Mapping[str, TensorInfo]
    ) -> None:
        from loraship.check.verify import library_problems, verify_weights
        from loraship.engine.stream import TensorStreamer

        if self._streamer is None:
            self._streamer = TensorStreamer(self._check_reader)
        prepared = replace(self.prepared, plan=replace(self.prepared.plan, tensors=tensors))
        merged = Checkpoint(folder=path.parent, files=(path,), tensors=dict(found), metadata={})
        report = verify_weights(prepared, merged, streamer=self._streamer)
        self.result.weights.append(report)
        self.result.library.extend(library_problems(path, found))
        self._check_reader.forget(path)
        if report.mismatched or report.untouched_mismatched or report.wrong_layout or report.non_finite:
            raise StreamStopped(f"{shard} failed its check")

    def _release_inputs(self, index: int) -> None:
        if self.keep or self.feed is None:
            return
        for path, last in self._last_use.items():
            if last == index and path.parent == self.feed.folder:
                if self._merge_reader is not None:
                    self._merge_reader.forget(path)
                self._check_reader.forget(path)
                self.feed.release(path.name)

    def _upload_loop(self) -> None:
        while (item := self._uploads.get()) is not None:
            shard, path, identity = item
            delete = not self.keep
            if self.upload is not None and self._error is None:
                delete = self._upload(shard, path, identity) and delete
            if delete:
                path.unlink()
            with self._cond:
                self._on_disk -= 1
                self._cond.notify_all()

    def _upload(self, shard: str, path: Path, identity: tuple[int, int, int]) -> bool:
        """Upload one shard as a blob; True when the commit can reference it without the file."""
        assert self.upload is not None
        hub, repo_id, create_pr = self.upload
        try:
            op, detached = hub.upload_blob(repo_id, path.parent, shard, create_pr=create_pr)
        except LorashipError as e:
            if not self.keep:  # the shard cannot stay: the disk holds only a few
                raise
            self.result.upload_problem = e.message
            return False
        if file_identity(path) != identity:  # cannot happen to a read-only file; never trust it if it does
            return False
        self.result.uploads[shard] = op
        self.result.identities[shard] = identity
        return detached


def reusable(result: StreamResult, folder: Path) -> dict[str, Any]:
    """The uploaded operations a commit may reuse: shards deleted since, or unchanged on disk."""
    return {
        name: op
        for name, op in result.uploads.items()
        if not (folder / name).exists() or file_identity(folder / name) == result.identities[name]
    }
