"""Streaming safetensors I/O: one tensor at a time, in and out.

The safetensors library reads files through mmap and writes whole state dicts; neither bounds
memory to one tensor (mapped pages count towards the process's resident memory, and ``save_file``
needs every tensor of a shard at once). This module therefore reads the (tiny, documented)
safetensors header itself, reads tensor bytes with ``pread`` into a buffer of exactly that tensor,
copies untouched tensors file-to-file without decoding them (``copy_file_range``), and writes
output shards whose header is computed up front from the plan, so tensors can be streamed into
place one after the other. Files written here are read back with the safetensors library in tests.

Format: 8-byte little-endian header length N, N bytes of JSON
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`` padded with
spaces to a multiple of 8, then the tensor data (offsets relative to the end of the header).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import struct
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraship.errors import BaseModelError, CorruptFileError

if TYPE_CHECKING:  # torch is imported where tensors are touched: planning and copying need none of it
    import torch

#: safetensors dtype code -> size of one element in bits.
DTYPE_BITS: dict[str, int] = {
    "F64": 64, "F32": 32, "F16": 16, "BF16": 16,
    "I64": 64, "I32": 32, "I16": 16, "I8": 8,
    "U64": 64, "U32": 32, "U16": 16, "U8": 8, "BOOL": 8,
    "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8,
    "F6_E2M3": 6, "F6_E3M2": 6, "F4": 4, "C64": 64,
}  # fmt: skip

#: safetensors dtype code -> name of the torch dtype, for the dtypes loraship computes with.
_TORCH_NAMES: dict[str, str] = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu",
}  # fmt: skip
FLOAT_CODES = frozenset({"F64", "F32", "F16", "BF16"})
#: torch dtype names <-> safetensors codes, for the floating-point dtypes users name.
DTYPE_NAMES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "float64": "F64"}
CODE_NAMES = {v: k for k, v in DTYPE_NAMES.items()}

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
SHARD_PATTERN = "model{suffix}.safetensors"
_MAX_HEADER = 100 * 1024 * 1024
_MAX_COUNT = 2**63 - 1  # elements of a tensor, and a byte offset: what a 64-bit size holds
_MAX_DIMS = 64
#: More tensors than any real checkpoint file holds (DeepSeek-V3: ~91k in all, over 163 files).
MAX_TENSORS_PER_FILE = 262_144
_COPY_CHUNK = 64 * 1024 * 1024
_REDOWNLOAD = (
    "Download the file again: it was probably cut off during a download or copy "
    "(with huggingface_hub, pass force_download=True or delete it from the cache)."
)


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes are, and what they hold. No tensor data.

    Attributes:
        name: The tensor's name in its file.
        dtype: The safetensors dtype code (``"BF16"``, ``"F32"``, ...).
        shape: The tensor's shape.
        file: The file holding the bytes.
        offset: Absolute byte offset of the data in ``file``.
        nbytes: Length of the data in bytes.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    offset: int
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def nbytes_of(dtype: str, shape: Iterable[int]) -> int:
    """Bytes taken by a tensor of this safetensors dtype and shape."""
    bits = DTYPE_BITS[dtype] * math.prod(shape)
    return (bits + 7) // 8


def torch_dtype(code: str) -> torch.dtype:
    """The torch dtype for a safetensors dtype code."""
    import torch

    try:
        return getattr(torch, _TORCH_NAMES[code])
    except KeyError:
        raise ValueError(f"dtype {code} cannot be computed with") from None


def dtype_code(dtype: torch.dtype) -> str:
    """The safetensors dtype code of a torch dtype."""
    name = str(dtype).removeprefix("torch.")
    for code, torch_name in _TORCH_NAMES.items():
        if torch_name == name:
            return code
    raise ValueError(f"no safetensors dtype for {dtype}")


# --------------------------------------------------------------------------- reading headers


def read_header(path: Path) -> tuple[dict[str, str], dict[str, TensorInfo]]:
    """Read and validate the header of one safetensors file; reads no tensor data.

    Returns:
        The ``__metadata__`` mapping and the tensors, in the order of their data in the file.

    Raises:
        CorruptFileError: The file is truncated, its header is malformed, or its offsets do not
            describe the file's data exactly.
    """
    size = path.stat().st_size
    with path.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CorruptFileError(
                f"`{path}` is not a safetensors file: it is {size} bytes long, shorter than the 8-byte header length.",
                fix=_REDOWNLOAD,
            )
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(size - 8, _MAX_HEADER):
            raise CorruptFileError(
                f"`{path}` is truncated or not a safetensors file: its header length says "
                f"{header_len} bytes but the file holds {size - 8} bytes after the length.",
                fix=_REDOWNLOAD,
            )
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except ValueError as e:
        raise CorruptFileError(f"`{path}` has a corrupt header: it is not valid JSON ({e}).", fix=_REDOWNLOAD) from e
    except RecursionError as e:
        raise CorruptFileError(f"`{path}` has a corrupt header: its JSON is nested too deeply.", fix=_REDOWNLOAD) from e
    if not isinstance(header, dict):
        raise CorruptFileError(f"`{path}` has a corrupt header: it is not a JSON object.", fix=_REDOWNLOAD)
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CorruptFileError(
            f"`{path}` has a corrupt header: its `__metadata__` is not a mapping of strings to strings.",
            fix=_REDOWNLOAD,
        )
    if len(header) > MAX_TENSORS_PER_FILE:
        raise CorruptFileError(
            f"`{path}` has a corrupt header: it lists {len(header)} tensors, more than the "
            f"{MAX_TENSORS_PER_FILE} any real checkpoint file holds.",
            fix=_REDOWNLOAD,
        )
    data_start = 8 + header_len
    tensors: list[TensorInfo] = []
    for name, entry in header.items():
        tensors.append(_tensor_entry(path, name, entry, data_start))
    tensors.sort(key=lambda t: t.offset)
    expected = data_start
    for t in tensors:
        if t.offset != expected:
            raise CorruptFileError(
                f"`{path}` has a corrupt header: tensor `{t.name}` starts at byte "
                f"{t.offset - data_start} of the data, expected {expected - data_start} "
                "(overlapping or missing bytes).",
                fix=_REDOWNLOAD,
            )
        expected = t.offset + t.nbytes
    if expected != size:
        raise CorruptFileError(
            f"`{path}` is truncated: its header describes {expected - data_start} bytes of tensor "
            f"data but the file holds {size - data_start}.",
            fix=_REDOWNLOAD,
        )
    return dict(metadata), {t.name: t for t in tensors}


def _tensor_entry(path: Path, name: str, entry: Any, data_start: int) -> TensorInfo:
    def corrupt(problem: str) -> CorruptFileError:
        return CorruptFileError(f"`{path}` has a corrupt header: tensor `{name}` {problem}.", fix=_REDOWNLOAD)

    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise corrupt("lacks a dtype, shape or data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str):
        raise corrupt(f"has a dtype that is not a string ({json.dumps(dtype)[:40]})")
    if dtype not in DTYPE_BITS:
        raise CorruptFileError(
            f"`{path}` has tensor `{name}` of unknown dtype {dtype!r}.",
            fix="Upgrade loraship, or convert the checkpoint with a current safetensors version.",
        )
    if not isinstance(shape, list) or not all(_is_size(d) for d in shape) or len(shape) > _MAX_DIMS:
        raise corrupt(f"has a shape that is not a list of sizes (whole numbers from 0): {json.dumps(shape)[:80]}")
    count = 1
    for d in shape:  # as the safetensors library multiplies: a product past 64 bits is refused there
        count *= d
        if count > _MAX_COUNT:
            raise corrupt(f"has a shape too large to be real: {shape}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_size(x) for x in offsets)):
        raise corrupt(f"has data_offsets that are not two byte offsets: {json.dumps(offsets)[:80]}")
    begin, end = offsets
    if begin > end:
        raise corrupt(f"ends (byte {end}) before it begins (byte {begin})")
    needed = nbytes_of(dtype, shape)
    if end - begin != needed:
        raise corrupt(f"({dtype}, shape {shape}) needs {needed} bytes but its offsets span {end - begin}")
    return TensorInfo(name, dtype, tuple(shape), path, data_start + begin, end - begin)


def _is_size(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _MAX_COUNT


# --------------------------------------------------------------------------- checkpoints


@dataclass(frozen=True)
class Checkpoint:
    """The tensors of a model folder's safetensors weights, without their data.

    Attributes:
        folder: The model folder.
        files: The weight files, in index order.
        tensors: Every tensor, in file order then data order.
        metadata: The ``__metadata__`` of the first file.
    """

    folder: Path
    files: tuple[Path, ...]
    tensors: Mapping[str, TensorInfo]
    metadata: Mapping[str, str] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def largest_tensor_bytes(self) -> int:
        return max((t.nbytes for t in self.tensors.values()), default=0)


def weight_files(folder: Path) -> tuple[Path, ...] | None:
    """The safetensors weight files of a model folder, or None if it has none.

    Raises:
        BaseModelError: The index is unreadable or names files that are missing.
    """
    index = folder / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = list(dict.fromkeys(str(v) for v in weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
            raise CorruptFileError(
                f"`{index}` is not a valid safetensors index (a JSON object with a `weight_map`).",
                fix=_REDOWNLOAD,
            ) from e
        for name in names:
            if Path(name).is_absolute() or ".." in Path(name).parts:
                raise CorruptFileError(
                    f"`{index}` names the weight file `{name}`, outside `{folder}`: an index may name only files in "
                    "its own folder.",
                    fix="Correct the index: its weight_map values are file names in the model folder.",
                )
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise BaseModelError(
                f"`{index}` lists {len(missing)} weight file(s) missing from `{folder}`: " + ", ".join(missing) + ".",
                fix="Download the complete model (every file the index lists).",
            )
        return tuple(folder / n for n in names)
    single = folder / SINGLE_NAME
    if single.is_file():
        return (single,)
    return None


def read_checkpoint(folder: Path, files: tuple[Path, ...]) -> Checkpoint:
    """Read the headers of a checkpoint's weight files and check the index agrees with them."""
    tensors: dict[str, TensorInfo] = {}
    metadata: dict[str, str] = {}
    for i, path in enumerate(files):
        meta, found = read_header(path)
        if i == 0:
            metadata = meta
        for name, info in found.items():
            if name in tensors:
                raise CorruptFileError(
                    f"Tensor `{name}` is stored twice, in `{tensors[name].file.name}` and `{path.name}`.",
                    fix=_REDOWNLOAD,
                )
            tensors[name] = info
    index = folder / INDEX_NAME
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        for name, file in weight_map.items():
            if name not in tensors or tensors[name].file.name != file:
                raise CorruptFileError(
                    f"`{index}` says tensor `{name}` is in `{file}`, but that file does not hold it.",
                    fix=_REDOWNLOAD,
                )
    return Checkpoint(folder=folder, files=files, tensors=tensors, metadata=metadata)


# --------------------------------------------------------------------------- reading data


class TensorReader:
    """Reads tensors by ``pread`` into buffers of exactly one tensor; keeps files open.

    ``gate``: called with a file's path before it is first opened, and may block until the file is
    there (a streaming run's base shards arrive while the merge runs) or raise.
    """

    def __init__(self, gate: Callable[[Path], None] | None = None) -> None:
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()
        self.gate = gate

    def fd(self, path: Path) -> int:
        """An open descriptor of ``path`` (reads use explicit offsets: safe from several threads)."""
        with self._lock:
            if path in self._fds:
                return self._fds[path]
        if self.gate is not None:
            self.gate(path)  # outside the lock: it may wait for a download
        with self._lock:
            if path not in self._fds:
                self._fds[path] = os.open(path, os.O_RDONLY)
            return self._fds[path]

    def read(self, info: TensorInfo) -> torch.Tensor:
        """The tensor's data as a new CPU tensor of its dtype and shape."""
        import torch

        buf = self.read_bytes(info, 0, info.nbytes)
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=torch_dtype(info.dtype))
        flat = torch.frombuffer(buf, dtype=torch.uint8)
        return flat.view(torch_dtype(info.dtype)).reshape(info.shape)

    def read_rows(self, info: TensorInfo, start: int, stop: int, *, into: torch.Tensor | None = None) -> torch.Tensor:
        """Rows ``start:stop`` (first dimension) of a tensor, reading only their bytes.

        Args:
            into: A uint8 buffer to read into (reused across calls to avoid fresh pages); a new
                buffer when None.
        """
        import torch

        row_bytes = info.nbytes // info.shape[0]
        length = (stop - start) * row_bytes
        shape = (stop - start, *info.shape[1:])
        if length == 0:
            return torch.empty(shape, dtype=torch_dtype(info.dtype))
        if into is None:
            flat = torch.frombuffer(self.read_bytes(info, start * row_bytes, length), dtype=torch.uint8)
        else:
            flat = into[:length]
            self._read_into(info, start * row_bytes, tensor_bytes(flat))
        return flat.view(torch_dtype(info.dtype)).reshape(shape)

    def read_bytes(self, info: TensorInfo, start: int, length: int) -> bytearray:
        buf = bytearray(length)
        self._read_into(info, start, memoryview(buf))
        return buf

    def _read_into(self, info: TensorInfo, start: int, view: memoryview) -> None:
        length = len(view)
        fd = self.fd(info.file)
        done = 0
        while done < length:
            n = os.preadv(fd, [view[done:]], info.offset + start + done)
            if n == 0:
                raise CorruptFileError(f"`{info.file}` ended while reading tensor `{info.name}`.", fix=_REDOWNLOAD)
            done += n

    def forget(self, path: Path) -> None:
        """Close ``path`` (a deleted file's space is freed only when no descriptor holds it)."""
        with self._lock:
            fd = self._fds.pop(path, None)
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a contiguous CPU tensor (keep ``t`` alive while using it)."""
    if not t.is_contiguous():
        raise ValueError("tensor_bytes needs a contiguous tensor")
    n = t.numel() * t.element_size()
    if n == 0:
        return memoryview(b"")
    return memoryview((ctypes.c_char * n).from_address(t.data_ptr())).cast("B")


# --------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class OutputTensor:
    """Name, dtype code and shape of a tensor to be written."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return nbytes_of(self.dtype, self.shape)


def build_header(tensors: Iterable[OutputTensor], metadata: Mapping[str, str]) -> bytes:
    """The length prefix and JSON header of a safetensors file holding ``tensors`` in order."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


class ShardWriter:
    """Writes one safetensors file whose tensors are known up front, one tensor at a time.

    Tensors must be written in the order given, each exactly its size; :meth:`close` checks that
    every tensor was written.
    """

    def __init__(self, path: Path, tensors: list[OutputTensor], metadata: Mapping[str, str]) -> None:
        self.path = path
        self._tensors = tensors
        self._next = 0
        self._remaining = 0
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._write_all(build_header(tensors, metadata))

    def begin(self, name: str) -> None:
        """Start writing tensor ``name`` (the next one in order)."""
        if self._remaining:
            raise RuntimeError(f"{self._tensors[self._next - 1].name} is incomplete")
        expected = self._tensors[self._next]
        if expected.name != name:
            raise RuntimeError(f"wrote {name} where {expected.name} was planned")
        self._next += 1
        self._remaining = expected.nbytes

    def write(self, data: memoryview | bytes | bytearray) -> None:
        """Append bytes of the current tensor."""
        n = len(data)
        if n > self._remaining:
            raise RuntimeError(f"too many bytes for {self._tensors[self._next - 1].name}")
        self._write_all(data)
        self._remaining -= n

    def copy_from(self, fd: int, offset: int, length: int) -> None:
        """Append ``length`` bytes of the current tensor copied from another file, undecoded."""
        if length > self._remaining:
            raise RuntimeError(f"too many bytes for {self._tensors[self._next - 1].name}")
        copy_range(fd, offset, length, self._fd)
        self._remaining -= length

    def close(self) -> None:
        """Close the file; raises if a planned tensor was not written in full."""
        fd, self._fd = self._fd, -1
        os.close(fd)
        if self._remaining or self._next != len(self._tensors):
            raise RuntimeError(f"{self.path.name}: not every planned tensor was written")

    def abort(self) -> None:
        """Close the file if still open (after :meth:`close`, its descriptor's number may belong to another file)."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)

    def _write_all(self, data: memoryview | bytes | bytearray) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]


def copy_range(src_fd: int, offset: int, length: int, dst_fd: int) -> None:
    """Copy ``length`` bytes at ``offset`` of ``src_fd`` to the current position of ``dst_fd``.

    Uses ``copy_file_range`` (in-kernel, no user-space buffer), falling back to bounded reads.
    """
    done = 0
    if hasattr(os, "copy_file_range"):
        try:
            while done < length:
                n = os.copy_file_range(src_fd, dst_fd, min(length - done, 1 << 30), offset + done)
                if n == 0:
                    break
                done += n
        except OSError:
            pass  # another filesystem or kernel without support: fall back below
    while done < length:
        chunk = os.pread(src_fd, min(_COPY_CHUNK, length - done), offset + done)
        if not chunk:
            raise CorruptFileError(f"source file ended after {offset + done} bytes", fix=_REDOWNLOAD)
        view = memoryview(chunk)
        while view:
            w = os.write(dst_fd, view)
            view = view[w:]
        done += len(chunk)
