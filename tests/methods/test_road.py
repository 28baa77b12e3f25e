"""RoAd against PEFT: each output tensor bit-identical to ``merge_and_unload()`` on CPU, on fp32, bf16 and fp16
bases (road_1, road_2 and road_4, two group sizes, attention biases rotated too, a bf16 adapter); the merged folder
loaded with plain transformers behaves as PEFT's unmerged model; ``verify``; and what loraship refuses.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import (
    LLAMA,
    QWEN2,
    assert_changes_as_planned,
    assert_same_tensors,
    load_tensors,
    peft_outputs,
    peft_reference,
    plain_outputs,
)

from loraship.engine.merge import merge
from loraship.errors import IncompatibleError
from loraship.methods.base import method_of
from loraship.tiny import build_method_adapter

ATTN_MLP = ["q_proj", "v_proj", "up_proj", "down_proj"]
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]  # 16, 8, 8 and 16 outputs


@dataclass(frozen=True)
class Case:
    id: str
    settings: dict[str, Any]
    config: dict[str, Any]
    adapter_dtype: str | None = None


CASES = [
    Case("road-1", {"target_modules": ATTN_MLP, "variant": "road_1", "group_size": 4}, LLAMA),
    Case("road-2", {"target_modules": ATTN_MLP, "variant": "road_2", "group_size": 4}, LLAMA),
    Case("road-4", {"target_modules": ATTN_MLP, "variant": "road_4", "group_size": 4}, LLAMA),
    Case("road-1-groups-of-8", {"target_modules": ATTN, "variant": "road_1", "group_size": 8}, LLAMA),
    Case("road-4-groups-of-8", {"target_modules": ATTN, "variant": "road_4", "group_size": 8}, LLAMA),
    Case("road-2-bias", {"target_modules": ATTN, "variant": "road_2", "group_size": 8}, QWEN2),
    Case("road-4-bias", {"target_modules": ["q_proj", "v_proj"], "variant": "road_4", "group_size": 4}, QWEN2),
    Case(
        "road-adapter-bf16",
        {"target_modules": ["q_proj", "o_proj"], "variant": "road_2", "group_size": 4},
        LLAMA,
        adapter_dtype="bfloat16",
    ),
]
DTYPES = ["float32", "bfloat16", "float16"]


def _inputs() -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(0, 30, (1, 9), generator=torch.Generator().manual_seed(0))}


def _adapter(case: Case, base: Path, folder: Path) -> Path:
    return build_method_adapter(base, folder, "ROAD", adapter_dtype=case.adapter_dtype, **case.settings)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bit_identical_to_peft(case: Case, dtype: str, model_cache, tmp_path: Path) -> None:
    base = model_cache(case.config, dtype=dtype)
    adapter = _adapter(case, base, tmp_path / "adapter")
    result = merge(base, adapter, tmp_path / "merged", progress=False)
    reference = peft_reference(base, adapter, tmp_path / "peft", dtype=getattr(torch, dtype))
    ours = load_tensors(tmp_path / "merged")
    untouched = frozenset(t.name for t in result.prepared.plan.tensors if not t.changed)
    assert_same_tensors(ours, reference, upcast_ok=untouched)
    assert_changes_as_planned(result.prepared.plan, ours, base)
    if case.config is QWEN2:
        assert {t.name for t in result.prepared.plan.changed if t.name.endswith(".bias")}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_merged_folder_behaves_like_base_plus_adapter(case: Case, model_cache, tmp_path: Path) -> None:
    base = model_cache(case.config, dtype="float32")
    adapter = _adapter(case, base, tmp_path / "adapter")
    merge(base, adapter, tmp_path / "merged", progress=False)
    expected = peft_outputs(base, adapter, _inputs())
    torch.testing.assert_close(plain_outputs(tmp_path / "merged", _inputs()), expected, rtol=1e-4, atol=1e-4)


def test_verify_passes_a_correct_merge_and_fails_a_doubled_one(model_cache, tmp_path: Path) -> None:
    from loraship.check.verify import verify

    case = CASES[5]  # road_2 with biases
    base = model_cache(case.config)
    adapter = _adapter(case, base, tmp_path / "adapter")
    merge(base, adapter, tmp_path / "merged", progress=False)
    report = verify(base, adapter, tmp_path / "merged", threshold_overrides={"generation_tokens": 4})
    assert report.passed, report.failed_checks
    assert report.weights.exact == report.weights.changed > 0
    merge(tmp_path / "merged", adapter, tmp_path / "twice", progress=False)
    twice = verify(base, adapter, tmp_path / "twice", threshold_overrides={"generation_tokens": 4})
    failed = {f"{c.level}: {c.name}" for c in twice.checks if c.passed is False}
    assert {"weights: changed tensors recomputed", "outputs: merge error / adapter effect"} <= failed


def test_plan_and_card_words(model_cache, tmp_path: Path) -> None:
    base = model_cache(LLAMA)
    adapter = build_method_adapter(
        base, tmp_path / "adapter", "ROAD", target_modules=["q_proj"], variant="road_4", group_size=8
    )
    result = merge(base, adapter, tmp_path / "merged", progress=False)
    modules = result.prepared.adapter.method_modules
    method = method_of("ROAD")
    assert method is not None and method.kind == "multiplicative"
    assert {method.describe(m) for m in modules} == {"RoAd road_4, groups of 8"}
    assert method.summary(modules) == "variant = road_4, group_size = 8"


def test_refuses_a_base_of_other_width(model_cache, tmp_path: Path) -> None:
    base = model_cache(LLAMA)
    adapter = build_method_adapter(
        base, tmp_path / "adapter", "ROAD", target_modules=["q_proj"], variant="road_1", group_size=4
    )
    wider = model_cache({**LLAMA, "hidden_size": 32})
    with pytest.raises(IncompatibleError) as e:
        merge(wider, adapter, tmp_path / "merged", progress=False)
    assert e.value.message == (
        "Shape mismatch for `model.layers.0.self_attn.q_proj.weight`: the base tensor is [32, 32], but the adapter's "
        "road_theta and road_alpha have 8 values, not the 16 PEFT makes for road_1 on 32 output features."
    )


def test_refuses_a_group_size_that_does_not_divide(model_cache, tmp_path: Path) -> None:
    base = model_cache(LLAMA)
    adapter = build_method_adapter(
        base, tmp_path / "adapter", "ROAD", target_modules=["q_proj"], variant="road_2", group_size=4
    )
    path = adapter / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "group_size": 6}))
    with pytest.raises(IncompatibleError) as e:
        merge(base, adapter, tmp_path / "merged", progress=False)
    assert e.value.message == (
        "Shape mismatch for `model.layers.0.self_attn.q_proj.weight`: the base tensor is [16, 16], but PEFT's RoAd "
        "needs the layer's 16 output features to be divisible by group_size = 6."
    )


def test_shape_problems_in_words() -> None:
    """What PEFT's RoAd does not adapt: Conv1D (weights stored (in, out)) and convolutions."""
    method = method_of("ROAD")
    assert method is not None

    @dataclass(frozen=True)
    class Info:
        name: str
        shape: tuple[int, ...]

    m = method.module(
        "q", {"road_theta": Info("t", (8,)), "road_alpha": Info("a", (8,))}, {"variant": "road_1", "group_size": 4},
        Path("a"),
    )  # fmt: skip
    assert method.shape_problem(m, "weight", (16, 4), False) is None
    assert method.shape_problem(m, "bias", (16,), False) is None
    assert method.shape_problem(m, "weight", (4, 16), True) == (
        "RoAd on a Conv1D layer (weights stored (in, out)) is not merged (PEFT's RoAd adapts only Linear layers)"
    )
    assert method.shape_problem(m, "weight", (16, 4, 3, 3), False) == (
        "RoAd on a 4-D weight is not merged (PEFT's RoAd adapts only Linear layers)"
    )
