"""Streaming safetensors I/O: files we write are read back by the safetensors library, byte for byte."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraship.engine.safetensors_io import (
    MAX_TENSORS_PER_FILE,
    OutputTensor,
    ShardWriter,
    TensorReader,
    copy_range,
    dtype_code,
    nbytes_of,
    read_header,
    tensor_bytes,
)
from loraship.errors import CorruptFileError

TENSORS = {
    "a.weight": torch.randn(5, 7, dtype=torch.float32),
    "b.weight": torch.randn(3, 4).to(torch.bfloat16),
    "c.bias": torch.randn(3).to(torch.float16),
    "d.count": torch.tensor([1, 2, 3], dtype=torch.int64),
    "e.mask": torch.tensor([True, False]),
    "f.scalar": torch.tensor(2.5),
    "g.empty": torch.zeros(0, 4),
}


def test_writer_output_reads_back_with_safetensors(tmp_path: Path) -> None:
    specs = [OutputTensor(n, dtype_code(t.dtype), tuple(t.shape)) for n, t in TENSORS.items()]
    writer = ShardWriter(tmp_path / "out.safetensors", specs, {"format": "pt"})
    for spec in specs:
        writer.begin(spec.name)
        data = tensor_bytes(TENSORS[spec.name].contiguous())
        half = len(data) // 2
        writer.write(data[:half])  # tensors can arrive in pieces
        writer.write(data[half:])
    writer.close()
    loaded = load_file(str(tmp_path / "out.safetensors"))
    assert set(loaded) == set(TENSORS)
    for name, t in TENSORS.items():
        assert loaded[name].dtype == t.dtype and torch.equal(loaded[name], t)
    metadata, infos = read_header(tmp_path / "out.safetensors")
    assert metadata == {"format": "pt"}
    assert [infos[n].nbytes for n in TENSORS] == [t.numel() * t.element_size() for t in TENSORS.values()]


def test_reader_reads_what_safetensors_wrote(tmp_path: Path) -> None:
    save_file(TENSORS, str(tmp_path / "in.safetensors"), metadata={"format": "pt"})
    _, infos = read_header(tmp_path / "in.safetensors")
    with TensorReader() as reader:
        for name, t in TENSORS.items():
            got = reader.read(infos[name])
            assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(got, t)
        rows = reader.read_rows(infos["a.weight"], 1, 4)
        assert torch.equal(rows, TENSORS["a.weight"][1:4])


def test_writer_refuses_out_of_plan_writes(tmp_path: Path) -> None:
    specs = [OutputTensor("x", "F32", (2,)), OutputTensor("y", "F32", (2,))]
    writer = ShardWriter(tmp_path / "o.safetensors", specs, {})
    with pytest.raises(RuntimeError, match="wrote y where x was planned"):
        writer.begin("y")
    writer.begin("x")
    with pytest.raises(RuntimeError, match="too many bytes"):
        writer.write(b"\0" * 12)
    writer.write(b"\0" * 8)
    with pytest.raises(RuntimeError, match="not every planned tensor was written"):
        writer.close()


def test_copy_range_copies_exact_bytes(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.write_bytes(bytes(range(256)) * 1000)
    dst = tmp_path / "dst"
    sfd, dfd = os.open(src, os.O_RDONLY), os.open(dst, os.O_WRONLY | os.O_CREAT)
    try:
        copy_range(sfd, 1000, 5000, dfd)
        copy_range(sfd, 7, 3, dfd)
    finally:
        os.close(sfd)
        os.close(dfd)
    data = src.read_bytes()
    assert dst.read_bytes() == data[1000:6000] + data[7:10]


def test_nbytes_of_packed_dtypes() -> None:
    assert nbytes_of("BF16", (3, 4)) == 24
    assert nbytes_of("F4", (3, 4)) == 6
    assert nbytes_of("F32", ()) == 4


def _file(header: bytes, data: bytes = b"") -> bytes:
    return len(header).to_bytes(8, "little") + header + data


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"abc", "is not a safetensors file: it is 3 bytes long, shorter than the 8-byte header length."),
        ((10**6).to_bytes(8, "little") + b"{}", "is truncated or not a safetensors file: its header length says "
                                                "1000000 bytes but the file holds 2 bytes after the length."),
        ((2).to_bytes(8, "little") + b"[]", "has a corrupt header: it is not a JSON object."),
        (_file(b'{"x":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}'),
         "has a corrupt header: tensor `x` (F32, shape [2]) needs 8 bytes but its offsets span 4."),
        (_file(b'{"x":{"dtype":"F32","shape":1}}'),
         "has a corrupt header: tensor `x` lacks a dtype, shape or data_offsets."),
        (_file(b'{"x":{"dtype":"F32","shape":[1e400,64],"data_offsets":[0,0]}}'),
         "has a corrupt header: tensor `x` has a shape that is not a list of sizes (whole numbers from 0): "
         "[Infinity, 64]."),
        (_file(b'{"x":{"dtype":"F32","shape":[-4,-1],"data_offsets":[0,16]}}', b"\0" * 16),
         "has a corrupt header: tensor `x` has a shape that is not a list of sizes (whole numbers from 0): [-4, -1]."),
        (_file(b'{"x":{"dtype":"F32","shape":[4294967296,4294967296,0],"data_offsets":[0,0]}}'),
         "has a corrupt header: tensor `x` has a shape too large to be real: [4294967296, 4294967296, 0]."),
        (_file(b'{"x":{"dtype":["F32"],"shape":[1],"data_offsets":[0,4]}}'),
         'has a corrupt header: tensor `x` has a dtype that is not a string (["F32"]).'),
        (_file(b'{"x":{"dtype":"F32","shape":[1],"data_offsets":[4,0]}}'),
         "has a corrupt header: tensor `x` ends (byte 0) before it begins (byte 4)."),
        (_file(b'{"x":{"dtype":"F32","shape":[4096],"data_offsets":[-16384,0]}}'),
         "has a corrupt header: tensor `x` has data_offsets that are not two byte offsets: [-16384, 0]."),
        (_file(b'{"__metadata__":["a"]}'),
         "has a corrupt header: its `__metadata__` is not a mapping of strings to strings."),
        (_file(b"[" * 100_000 + b"]" * 100_000), "has a corrupt header: its JSON is nested too deeply."),
        (_file(json.dumps({f"t{i}": {} for i in range(MAX_TENSORS_PER_FILE + 1)}).encode()),
         f"has a corrupt header: it lists {MAX_TENSORS_PER_FILE + 1} tensors, more than the {MAX_TENSORS_PER_FILE} "
         "any real checkpoint file holds."),
    ],
)  # fmt: skip
def test_corrupt_headers(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(CorruptFileError) as info:
        read_header(path)
    assert info.value.message == f"`{path}` {message}"


def test_overlapping_tensors_are_corrupt(tmp_path: Path) -> None:
    header = (
        b'{"x":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"y":{"dtype":"U8","shape":[4],"data_offsets":[2,6]}}'
    )
    path = tmp_path / "o.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 6)
    with pytest.raises(CorruptFileError, match="tensor `y` starts at byte 2 of the data, expected 4"):
        read_header(path)


def test_aborting_a_closed_shard_leaves_the_descriptor_number_to_its_new_owner(tmp_path: Path) -> None:
    """A merge that fails after a shard was closed aborts every shard: closing the old descriptor
    number again would close whatever file reused it (a streaming run's base reader: EBADF)."""
    import os

    from loraship.engine.safetensors_io import OutputTensor, ShardWriter

    shard = ShardWriter(tmp_path / "a.safetensors", [OutputTensor("x", "U8", (0,))], {"format": "pt"})
    shard.begin("x")
    shard.close()
    other = os.open(tmp_path / "a.safetensors", os.O_RDONLY)  # the lowest free number: the one just closed
    try:
        shard.abort()
        os.fstat(other)  # still open
    finally:
        os.close(other)
