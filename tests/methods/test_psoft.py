"""PSOFT against PEFT: each output tensor bit-identical to ``merge_and_unload()`` on CPU, on fp32, bf16 and fp16
bases, with PEFT's SVD of the base weight recomputed as PEFT does at load (full and low-rank SVD, PSOFT and PiSSA
initialisation, exact and Cayley-Neumann rotations, a free R, with and without magnitudes, a bf16 adapter); the merged
folder loaded with plain transformers behaves as PEFT's unmerged model; ``verify`` passes the merge and fails a
doubled one; and what loraship refuses.
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
    peft_type = "PSOFT"


CASES = [
    Case("psoft", {"target_modules": ATTN_MLP, "r": 4}, LLAMA),
    Case("psoft-pissa-init", {"target_modules": ATTN_MLP, "r": 4, "ab_svd_init": "pissa_init", "psoft_alpha": 8},
         LLAMA),
    Case("psoft-lowrank", {"target_modules": ATTN_MLP, "r": 3, "psoft_svd": "lowrank", "psoft_svd_lowrank_niter": 4,
                           "random_seed": 7}, LLAMA),
    Case("psoft-cayley-neumann", {"target_modules": ATTN_MLP, "r": 4, "use_cayley_neumann": True}, LLAMA),
    Case("psoft-cayley-neumann-eps", {"target_modules": ATTN_MLP, "r": 5, "use_cayley_neumann": True,
                                      "num_cayley_neumann_terms": 7, "cayley_neumann_eps": 0.05}, LLAMA),
    Case("psoft-free-r", {"target_modules": ATTN_MLP, "r": 4, "psoft_orth": False, "psoft_mag_a": False}, LLAMA),
    Case("psoft-no-magnitudes", {"target_modules": ATTN_MLP, "r": 2, "psoft_mag_a": False, "psoft_mag_b": False},
         LLAMA),
    Case("psoft-adapter-bf16", {"target_modules": ["q_proj", "o_proj"], "r": 2}, LLAMA, adapter_dtype="bfloat16"),
    Case("psoft-bias", {"target_modules": ["q_proj", "v_proj"], "r": 4, "init_weights": False}, QWEN2),
    Case("psoft-wide", {"target_modules": ["q_proj", "up_proj", "down_proj"], "r": 16}, LLAMA_96),
    Case("psoft-wide-lowrank", {"target_modules": ["up_proj", "down_proj"], "r": 8, "psoft_svd": "lowrank"}, LLAMA_96),
]  # fmt: skip


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
    adapter = build_method_adapter(base, tmp_path / "adapter", "PSOFT", target_modules=["q_proj"], r=4, psoft_alpha=8)
    result = merge(base, adapter, tmp_path / "merged", progress=False)
    modules = result.prepared.adapter.method_modules
    method = method_of("PSOFT")
    assert method is not None and method.kind == "multiplicative"
    assert {method.describe(m) for m in modules} == {"PSOFT r=4 (full SVD of W recomputed, psoft_init, exact Cayley)"}
    assert method.summary(modules) == "r = 4, scale = 2, full SVD of W recomputed, psoft_init, exact Cayley"


def test_refuses_a_base_too_narrow_for_r(model_cache, tmp_path: Path) -> None:
    base = model_cache(LLAMA_96)
    adapter = build_method_adapter(base, tmp_path / "adapter", "PSOFT", target_modules=["q_proj"], r=20)
    with pytest.raises(IncompatibleError, match=r"the adapter's rank r = 20 needs a weight of at least 20 rows and "):
        merge(model_cache(LLAMA), adapter, tmp_path / "merged", progress=False)
