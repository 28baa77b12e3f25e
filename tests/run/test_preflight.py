"""Preflight: the sizes a run will need, estimated from the config and the Hub's file sizes, match
what the merge writes; the machine's available memory is read as the kernel and the cgroup say."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import LLAMA

from loraship.engine.merge import merge
from loraship.run.preflight import available_memory, element_sizes
from loraship.tiny import build_adapter, build_model, quantize_fp8


@pytest.mark.parametrize(
    ("config", "out_dtype", "check", "requantize", "expected"),
    [
        ({"dtype": "bfloat16"}, None, "auto", False, (2, 2, 2)),
        ({"dtype": "bfloat16"}, "float32", "auto", False, (2, 4, 4)),
        ({"torch_dtype": "float32"}, "bfloat16", "float32", False, (4, 2, 4)),
        ({"dtype": "bfloat16", "quantization_config": {"quant_method": "fp8"}}, None, "auto", False, (1, 2, 2)),
        ({"dtype": "bfloat16", "quantization_config": {"quant_method": "fp8"}}, None, "auto", True, (1, 1, 2)),
    ],
    ids=["keep", "to-float32", "float32-base-to-bf16", "fp8-dequantized", "fp8-requantized"],
)
def test_element_sizes(config, out_dtype, check, requantize, expected) -> None:
    e = element_sizes(config, out_dtype, check, requantize=requantize)
    assert (e.stored, e.written, e.loaded) == expected


@pytest.mark.parametrize(("dtype", "fp8"), [(None, False), ("float32", False), (None, True)])
def test_estimate_matches_what_the_merge_writes(tmp_path: Path, dtype: str | None, fp8: bool) -> None:
    import json

    base = build_model(tmp_path / "base", {**LLAMA, "hidden_size": 64, "intermediate_size": 128}, dtype="bfloat16")
    if fp8:
        quantize_fp8(base, block=(32, 32))
    adapter = build_adapter(base, tmp_path / "adapter", target_modules=["q_proj"])
    merge(base, adapter, tmp_path / "out", dtype=dtype, progress=False)
    config = json.loads((base / "config.json").read_text())
    e = element_sizes(config, dtype, "auto", requantize=False)
    estimate = (base / "model.safetensors").stat().st_size / e.stored * e.written
    written = (tmp_path / "out" / "model.safetensors").stat().st_size
    # never below what is written (headers aside); above it for FP8, whose unquantized embeddings and norms
    # are counted as FP8 values that double: a disk check that errs on the safe side
    assert 0.99 * written <= estimate <= 1.2 * written


def test_available_memory_is_read_on_linux() -> None:
    found = available_memory()
    assert found is None or 0 < found < 1 << 50
