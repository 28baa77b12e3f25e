"""GraLoRA against PEFT: each output tensor bit-identical to ``merge_and_unload()`` on CPU, on fp32, bf16 and fp16
bases (2x2 and 4x4 blocks, with and without the hybrid LoRA, GPT-2's Conv1D weights stored (in, out), attention
biases left alone, a bf16 adapter); the merged folder loaded with plain transformers behaves as PEFT's unmerged
model; ``verify``; and what loraship refuses.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import GPT2, LLAMA, QWEN2
from methods.harness import DTYPES, check_behaves_like_peft, check_bit_identical, check_verify_catches_double_merge
from methods.harness import Case as MethodCase

from loraship.engine.merge import merge
from loraship.errors import AdapterError, IncompatibleError
from loraship.methods.base import method_of
from loraship.tiny import build_method_adapter

ATTN_MLP = ["q_proj", "v_proj", "up_proj", "down_proj"]


class Case(MethodCase):
    peft_type = "GRALORA"


CASES = [
    Case("gralora", {"target_modules": ATTN_MLP, "r": 4, "gralora_k": 2}, LLAMA),
    Case("gralora-hybrid", {"target_modules": ATTN_MLP, "r": 4, "gralora_k": 2, "hybrid_r": 2, "alpha": 8}, LLAMA),
    Case("gralora-k-4", {"target_modules": ATTN_MLP, "r": 8, "gralora_k": 4, "init_weights": False}, LLAMA),
    Case(
        "gralora-conv1d-gpt2",
        {"target_modules": ["c_attn", "c_fc", "c_proj"], "r": 4, "gralora_k": 2, "hybrid_r": 1, "fan_in_fan_out": True},
        GPT2,
    ),
    Case("gralora-bias", {"target_modules": ["q_proj", "k_proj"], "r": 2, "gralora_k": 2, "hybrid_r": 3}, QWEN2),
    Case(
        "gralora-adapter-bf16",
        {"target_modules": ["q_proj", "o_proj"], "r": 4, "gralora_k": 2, "hybrid_r": 2},
        LLAMA,
        adapter_dtype="bfloat16",
    ),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bit_identical_to_peft(case: Case, dtype: str, model_cache, tmp_path: Path) -> None:
    check_bit_identical(case, dtype, model_cache, tmp_path)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_merged_folder_behaves_like_base_plus_adapter(case: Case, model_cache, tmp_path: Path) -> None:
    check_behaves_like_peft(case, model_cache, tmp_path)


def test_verify_passes_a_correct_merge_and_fails_a_doubled_one(model_cache, tmp_path: Path) -> None:
    check_verify_catches_double_merge(CASES[1], model_cache, tmp_path)


def test_plan_and_card_words(model_cache, tmp_path: Path) -> None:
    base = model_cache(LLAMA)
    adapter = build_method_adapter(base, tmp_path / "adapter", "GRALORA", target_modules=["q_proj"], r=4,
                                   gralora_k=2, hybrid_r=2, alpha=12)  # fmt: skip
    result = merge(base, adapter, tmp_path / "merged", progress=False)
    modules = result.prepared.adapter.method_modules
    method = method_of("GRALORA")
    assert method is not None and method.kind == "additive"
    assert {method.describe(m) for m in modules} == {"GraLoRA 2x2 blocks r=4 + hybrid r=2 scale=2"}
    assert method.summary(modules) == "r = 4, gralora_k = 2, hybrid_r = 2, alpha = 12"


def test_refuses_a_base_of_other_width(model_cache, tmp_path: Path) -> None:
    base = model_cache(LLAMA)
    adapter = build_method_adapter(base, tmp_path / "adapter", "GRALORA", target_modules=["q_proj"], r=4, gralora_k=2)
    wider = model_cache({**LLAMA, "hidden_size": 32})
    with pytest.raises(IncompatibleError) as e:
        merge(wider, adapter, tmp_path / "merged", progress=False)
    assert e.value.message == (
        "Shape mismatch for `model.layers.0.self_attn.q_proj.weight`: the base tensor is [32, 32], but the adapter's "
        "gralora_A [2, 8, 4] is not the [2, 16, 4] PEFT makes for 32 output and 32 input features."
    )


def _edit_config(adapter: Path, **changes: Any) -> None:
    path = adapter / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_refuses_hybrid_factors_the_config_does_not_load(model_cache, tmp_path: Path) -> None:
    base = model_cache(LLAMA)
    adapter = build_method_adapter(base, tmp_path / "adapter", "GRALORA", target_modules=["q_proj"], r=4,
                                   gralora_k=2, hybrid_r=2)  # fmt: skip
    _edit_config(adapter, hybrid_r=0)
    with pytest.raises(AdapterError) as e:
        merge(base, adapter, tmp_path / "merged", progress=False)
    assert e.value.message == (
        f"`{adapter}`: the GraLoRA module `model.layers.0.self_attn.q_proj` has hybrid factors, but its config sets "
        "hybrid_r = 0, so PEFT does not load them."
    )


def test_refuses_r_not_a_multiple_of_k(model_cache, tmp_path: Path) -> None:
    base = model_cache(LLAMA)
    adapter = build_method_adapter(base, tmp_path / "adapter", "GRALORA", target_modules=["q_proj"], r=4, gralora_k=2)
    _edit_config(adapter, gralora_k=3)
    with pytest.raises(AdapterError) as e:
        merge(base, adapter, tmp_path / "merged", progress=False)
    assert e.value.message == (
        f"`{adapter}` sets r = 4 and gralora_k = 3, but PEFT's GraloraConfig needs r to be a multiple of gralora_k."
    )


def test_shape_problems_in_words() -> None:
    method = method_of("GRALORA")
    assert method is not None

    @dataclass(frozen=True)
    class Info:
        name: str
        shape: tuple[int, ...]

    m = method.module("q", {"gralora_A": Info("a", (2, 4, 2)), "gralora_B": Info("b", (2, 2, 3))},
                      {"r": 2, "gralora_k": 2}, Path("a"))  # fmt: skip
    assert method.shape_problem(m, "weight", (6, 8), False) is None
    assert method.shape_problem(m, "weight", (8, 6), True) is None
    assert method.shape_problem(m, "weight", (6, 9), False) == (
        "PEFT's GraLoRA needs gralora_k = 2 to divide the layer's 6 output and 9 input features"
    )
    assert method.shape_problem(m, "weight", (6, 8, 1, 1), False) == (
        "GraLoRA on a 4-D weight is not merged (PEFT's GraLoRA adapts only Linear and Conv1D layers)"
    )
