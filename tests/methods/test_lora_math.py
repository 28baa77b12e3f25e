"""The blocked LoRA path: blocks are bit-identical to the whole product, and the merge uses them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import LLAMA_WIDE

from loraship.engine.merge import prepare_merge
from loraship.engine.safetensors_io import TensorReader
from loraship.engine.stream import TensorStreamer
from loraship.methods import lora as lora_math
from loraship.tiny import build_adapter


def test_block_bounds_never_leave_a_tiny_tail() -> None:
    assert lora_math.block_bounds(4200, 256) == [(0, 4096), (4096, 4200)]
    assert lora_math.block_bounds(4100, 256) == [(0, 4100)]  # a 4-row tail joins the block before
    assert lora_math.block_bounds(10, 1 << 30) == [(0, 10)]
    assert all(stop - start >= 64 for start, stop in lora_math.block_bounds(1000, 12288))


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize(("out_f", "in_f", "r"), [(5632, 2048, 16), (2048, 5632, 16), (1000, 333, 7)])
def test_blocked_delta_equals_whole_product(out_f: int, in_f: int, r: int, fan_in_fan_out: bool) -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(r, in_f, generator=g), torch.randn(out_f, r, generator=g)
    rows = in_f if fan_in_fan_out else out_f
    row_len = out_f if fan_in_fan_out else in_f
    bounds = lora_math.block_bounds(rows, row_len * 4)
    assert len(bounds) > 1
    whole = lora_math.linear_delta(a, b, 2.0, fan_in_fan_out=fan_in_fan_out)
    assert lora_math.blocks_match(whole, a, b, 2.0, bounds, fan_in_fan_out=fan_in_fan_out)


def test_merge_streams_large_lora_tensors_in_blocks(model_cache, tmp_path: Path) -> None:
    base = model_cache(LLAMA_WIDE)
    adapter = build_adapter(base, tmp_path / "adapter", target_modules=["gate_proj"])
    plan = prepare_merge(base, adapter).plan
    (gate,) = [t for t in plan.tensors if t.name == "model.layers.0.mlp.gate_proj.weight"]
    with TensorReader() as reader, TensorStreamer(reader) as streamer:
        work = list(streamer.work(gate))
        chunks = [chunk for w, _ in work for chunk in w.result()]  # type: ignore[union-attr]
    assert [tuple(c.tensor.shape) for c in chunks] == [(4200, 64)]  # type: ignore[union-attr]
    assert [n for _, n in work] == [gate.nbytes]
    assert all(streamer._blocks_ok.values())


@pytest.mark.parametrize(("experts", "r", "out_f", "in_f"), [(4, 4, 24, 16), (16, 16, 1536, 512), (8, 8, 96, 768)])
@pytest.mark.parametrize("transposed", [False, True])
def test_one_experts_delta_equals_its_slice_of_the_whole(
    experts: int, r: int, out_f: int, in_f: int, transposed: bool
) -> None:
    """The merge computes each expert's slice of a fused parameter's delta alone (never the whole
    stack); it must be bit-identical to that slice of PEFT's einsum over every expert."""
    g = torch.Generator().manual_seed(experts)
    a, b = torch.randn(experts * r, in_f, generator=g), torch.randn(out_f, r * experts, generator=g)
    whole = lora_math.expert_delta(a, b, 1.7, experts, transposed=transposed)
    for e in range(experts):
        one = lora_math.expert_slice_delta(a, b, 1.7, experts, e, transposed=transposed)
        assert torch.equal(one.view(torch.int32), whole[e].contiguous().view(torch.int32)), e
