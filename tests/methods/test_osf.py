"""OSF against PEFT: each output tensor bit-identical to ``merge_and_unload()`` on CPU, on fp32, bf16 and fp16
bases, with PEFT's SVD of the base weight recomputed as PEFT does at load (default, whole and fractional effective
ranks, rank_pattern, square and non-square weights, wider layers, a bf16 adapter); the merged folder loaded with plain
transformers behaves as PEFT's unmerged model; ``verify`` passes the merge and fails a doubled one; and what loraship
refuses.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import LLAMA, QWEN2
from methods.harness import DTYPES, check_behaves_like_peft, check_bit_identical, check_verify_catches_double_merge
from methods.harness import Case as MethodCase

from loraship.engine.merge import merge
from loraship.errors import IncompatibleError
from loraship.methods.base import method_of
from loraship.tiny import build_method_adapter

ATTN_MLP = ["q_proj", "k_proj", "up_proj", "down_proj"]
#: Wider layers (256 x 96, 96 x 256): SVDs LAPACK computes in blocks.
LLAMA_96 = {**LLAMA, "hidden_size": 96, "intermediate_size": 256, "num_hidden_layers": 1, "num_attention_heads": 4,
            "num_key_value_heads": 2}  # fmt: skip


class Case(MethodCase):
    peft_type = "OSF"


CASES = [
    Case("osf", {"target_modules": ATTN_MLP}, LLAMA),
    Case("osf-random-init", {"target_modules": ATTN_MLP, "init_weights": False}, LLAMA),
    Case("osf-effective-rank", {"target_modules": ATTN_MLP, "effective_rank": 3}, LLAMA),
    Case("osf-fraction", {"target_modules": ATTN_MLP, "effective_rank": 0.25, "rank_pattern": {"up_proj": 12}}, LLAMA),
    Case("osf-adapter-bf16", {"target_modules": ["q_proj", "o_proj"]}, LLAMA, adapter_dtype="bfloat16"),
    Case("osf-bias", {"target_modules": ["q_proj", "v_proj", "o_proj"], "effective_rank": 2}, QWEN2),
    Case("osf-wide", {"target_modules": ["q_proj", "up_proj", "down_proj"], "effective_rank": 40}, LLAMA_96),
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
    adapter = build_method_adapter(base, tmp_path / "adapter", "OSF", target_modules=["q_proj", "k_proj"],
                                   effective_rank=5)  # fmt: skip
    result = merge(base, adapter, tmp_path / "merged", progress=False)
    modules = result.prepared.adapter.method_modules
    method = method_of("OSF")
    assert method is not None and method.kind == "multiplicative"
    assert {method.describe(m) for m in modules} == {
        "OSF 11 trainable singular directions (SVD of W recomputed)",
        "OSF 3 trainable singular directions (SVD of W recomputed)",
    }
    assert method.summary(modules) == (
        "trainable rank = 3–11 (the frozen part recomputed from each base weight's SVD, as PEFT does at load)"
    )


def test_refuses_a_base_of_other_width(model_cache, tmp_path: Path) -> None:
    base = model_cache(LLAMA)
    adapter = build_method_adapter(base, tmp_path / "adapter", "OSF", target_modules=["q_proj"])
    wider = model_cache({**LLAMA, "hidden_size": 32})
    with pytest.raises(
        IncompatibleError,
        match=r"the adapter's U_low \[16, 8\] and V_low \[8, 16\] need a \[16, 16\] weight with more than 8 "
        r"singular directions\.",
    ):
        merge(wider, adapter, tmp_path / "merged", progress=False)
