"""RoAd against PEFT: each output tensor bit-identical to ``merge_and_unload()`` on CPU, on fp32, bf16 and fp16
bases (road_1, road_2 and road_4, two group sizes, attention biases rotated too, a bf16 adapter); the merged folder
loaded with plain transformers behaves as PEFT's unmerged model; ``verify``; and what loraship refuses.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import LLAMA, QWEN2
from methods.harness import DTYPES, check_behaves_like_peft, check_bit_identical, check_verify_catches_double_merge
from methods.harness import Case as MethodCase

from loraship.engine.merge import merge
from loraship.errors import IncompatibleError
from loraship.methods.base import method_of
from loraship.tiny import build_method_adapter

ATTN_MLP = ["q_proj", "v_proj", "up_proj", "down_proj"]
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]  # 16, 8, 8 and 16 outputs


class Case(MethodCase):
    peft_type = "ROAD"


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


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bit_identical_to_peft(case: Case, dtype: str, model_cache, tmp_path: Path) -> None:
    result = check_bit_identical(case, dtype, model_cache, tmp_path).result
    if case.config is QWEN2:
        assert {t.name for t in result.prepared.plan.changed if t.name.endswith(".bias")}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_merged_folder_behaves_like_base_plus_adapter(case: Case, model_cache, tmp_path: Path) -> None:
    check_behaves_like_peft(case, model_cache, tmp_path)


def test_verify_passes_a_correct_merge_and_fails_a_doubled_one(model_cache, tmp_path: Path) -> None:
    check_verify_catches_double_merge(CASES[5], model_cache, tmp_path)  # road_2 with biases


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
