"""C3A against PEFT: each output tensor bit-identical to ``merge_and_unload()`` on CPU, on fp32, bf16 and fp16
bases (block sizes, a ``block_size_pattern``, PEFT's random initialisations, attention biases left alone, a bf16
adapter); the merged folder loaded with plain transformers behaves as PEFT's unmerged model; ``verify``; and what
loraship refuses.
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
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]


class Case(MethodCase):
    peft_type = "C3A"


CASES = [
    Case("c3a-block-4", {"target_modules": ATTN_MLP, "block_size": 4, "init_weights": False}, LLAMA),
    Case("c3a-block-8", {"target_modules": ATTN, "block_size": 8, "init_weights": "gaussian"}, LLAMA),
    Case(
        "c3a-block-size-pattern",
        {
            "target_modules": ATTN_MLP,
            "block_size": 4,
            "block_size_pattern": {"q_proj": 2, "down_proj": 8},
            "init_weights": "kaiming_uniform",
        },
        LLAMA,
    ),
    Case("c3a-zero-init", {"target_modules": ["q_proj", "o_proj"], "block_size": 16}, LLAMA),
    Case("c3a-bias", {"target_modules": ATTN, "block_size": 4, "init_weights": "xavier_uniform"}, QWEN2),
    Case(
        "c3a-adapter-bf16",
        {"target_modules": ["q_proj", "o_proj"], "block_size": 4, "init_weights": False},
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
    check_verify_catches_double_merge(CASES[0], model_cache, tmp_path)


def test_plan_and_card_words(model_cache, tmp_path: Path) -> None:
    base = model_cache(LLAMA)
    adapter = build_method_adapter(base, tmp_path / "adapter", "C3A", target_modules=["q_proj", "o_proj"],
                                   block_size=4, block_size_pattern={"o_proj": 8})  # fmt: skip
    result = merge(base, adapter, tmp_path / "merged", progress=False)
    modules = result.prepared.adapter.method_modules
    method = method_of("C3A")
    assert method is not None and method.kind == "additive"
    assert {method.describe(m) for m in modules} == {"C3A blocks of 4", "C3A blocks of 8"}
    assert method.summary(modules) == "block_size = 4–8"


def test_refuses_a_base_of_other_width(model_cache, tmp_path: Path) -> None:
    base = model_cache(LLAMA)
    adapter = build_method_adapter(base, tmp_path / "adapter", "C3A", target_modules=["q_proj"], block_size=4)
    wider = model_cache({**LLAMA, "hidden_size": 32})
    with pytest.raises(IncompatibleError) as e:
        merge(wider, adapter, tmp_path / "merged", progress=False)
    assert e.value.message == (
        "Shape mismatch for `model.layers.0.self_attn.q_proj.weight`: the base tensor is [32, 32], but the adapter's "
        "c3a_kernel [4, 4, 4] is not the [8, 8, 4] PEFT makes with blocks of 4."
    )


def test_refuses_a_block_size_that_does_not_divide(model_cache, tmp_path: Path) -> None:
    base = model_cache(LLAMA)
    adapter = build_method_adapter(base, tmp_path / "adapter", "C3A", target_modules=["q_proj"], block_size=4)
    path = adapter / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "block_size_pattern": {"q_proj": 6}}))
    with pytest.raises(IncompatibleError) as e:
        merge(base, adapter, tmp_path / "merged", progress=False)
    assert e.value.message == (
        "Shape mismatch for `model.layers.0.self_attn.q_proj.weight`: the base tensor is [16, 16], but its "
        "block_size_pattern['q_proj'] = 6 does not divide the layer's 16 output and 16 input features, as PEFT's "
        "C3A needs."
    )


def test_shape_problems_in_words() -> None:
    """What PEFT's C3A does not adapt: Conv1D (weights stored (in, out)) and convolutions."""
    method = method_of("C3A")
    assert method is not None

    @dataclass(frozen=True)
    class Info:
        name: str
        shape: tuple[int, ...]

    m = method.module("q", {"c3a_kernel": Info("k", (4, 2, 4))}, {"block_size": 4}, Path("a"))
    assert method.shape_problem(m, "weight", (16, 8), False) is None
    assert method.shape_problem(m, "weight", (8, 16), True) == (
        "C3A on a Conv1D layer (weights stored (in, out)) is not merged (PEFT's C3A adapts only Linear layers)"
    )
    assert method.shape_problem(m, "weight", (16, 8, 1, 1), False) == (
        "C3A on a 4-D weight is not merged (PEFT's C3A adapts only Linear layers)"
    )
