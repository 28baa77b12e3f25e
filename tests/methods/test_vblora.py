"""VB-LoRA against PEFT: each output tensor bit-identical to ``merge_and_unload()`` on CPU, on fp32, bf16 and fp16
bases (layers of different sizes, GPT-2's Conv1D, top-2 and top-3, full logits or ``save_only_topk_weights``, a bf16
adapter); the merged folder loaded with plain transformers behaves as PEFT's unmerged model; verify passes a correct
merge and fails a doubled one; and what loraship refuses.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import GPT2, LLAMA
from methods.harness import (
    DTYPES,
    check_behaves_like_peft,
    check_bit_identical,
    check_verify_catches_double_merge,
    edit_config,
)
from methods.harness import Case as MethodCase

from loraship.engine.merge import merge
from loraship.errors import AdapterError, IncompatibleError
from loraship.methods.base import Unsupported, method_of
from loraship.tiny import build_method_adapter

ATTN_MLP = ["q_proj", "v_proj", "up_proj", "down_proj"]
SMALL = {"num_vectors": 16, "vector_length": 8}
GPT2_BANK = {"num_vectors": 8, "vector_length": 16}


class Case(MethodCase):
    peft_type = "VBLORA"


CASES = [
    Case("vblora-top2", {"target_modules": ATTN_MLP, "r": 2, **SMALL}, LLAMA),
    Case("vblora-top3", {"target_modules": ATTN_MLP, "r": 4, "topk": 3, **SMALL}, LLAMA),
    Case("vblora-topk-only", {"target_modules": ATTN_MLP, "r": 3, "save_only_topk_weights": True, **SMALL}, LLAMA),
    Case(
        "vblora-topk-only-top4",
        {"target_modules": ["q_proj", "o_proj"], "r": 2, "topk": 4, "save_only_topk_weights": True, **SMALL},
        LLAMA,
    ),
    Case("vblora-gpt2", {"target_modules": ["c_attn", "c_fc", "c_proj"], "r": 2, **GPT2_BANK}, GPT2),
    Case("vblora-adapter-bf16", {"target_modules": ATTN_MLP, "r": 2, **SMALL}, LLAMA, adapter_dtype="bfloat16"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bit_identical_to_peft(case: Case, dtype: str, model_cache, tmp_path: Path) -> None:
    check_bit_identical(case, dtype, model_cache, tmp_path)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_merged_folder_behaves_like_base_plus_adapter(case: Case, model_cache, tmp_path: Path) -> None:
    check_behaves_like_peft(case, model_cache, tmp_path)


@pytest.mark.parametrize("topk_only", [False, True])
def test_verify_passes_a_correct_merge_and_fails_a_doubled_one(topk_only: bool, model_cache, tmp_path: Path) -> None:
    case = Case(
        "verify",
        {"target_modules": ["q_proj", "down_proj"], "r": 4, "save_only_topk_weights": topk_only, **SMALL},
        LLAMA,
    )
    check_verify_catches_double_merge(case, model_cache, tmp_path, changed=4)


def test_plan_and_card_words(model_cache, tmp_path: Path) -> None:
    base = model_cache(LLAMA)
    adapter = build_method_adapter(base, tmp_path / "adapter", "VBLORA", target_modules=["q_proj"], r=4,
                                   save_only_topk_weights=True, **SMALL)  # fmt: skip
    result = merge(base, adapter, tmp_path / "merged", progress=False)
    modules = result.prepared.adapter.method_modules
    method = method_of("VBLORA")
    assert method is not None
    assert {method.describe(m) for m in modules} == {"VB-LoRA r=4 top-2 of 16, top-k weights saved"}
    assert method.summary(modules) == "r = 4, topk = 2, num_vectors = 16, vector_length = 8"


def test_refuses_layers_the_vector_length_does_not_divide(model_cache, tmp_path: Path) -> None:
    base = model_cache(LLAMA)
    adapter = build_method_adapter(base, tmp_path / "adapter", "VBLORA", target_modules=["v_proj"], r=2, **SMALL)
    edit_config(adapter, vector_length=16)
    with pytest.raises(IncompatibleError) as e:
        merge(base, adapter, tmp_path / "merged", progress=False)
    assert str(e.value).splitlines()[0] == (
        "Shape mismatch for `model.layers.0.self_attn.v_proj.weight`: the base tensor is [8, 16], but PEFT's VB-LoRA "
        "needs both sizes of a layer divisible by its vector_length = 16, and this layer has 8 outputs and 16 inputs."
    )


def test_refuses_logits_of_another_rank(model_cache, tmp_path: Path) -> None:
    base = model_cache(LLAMA)
    adapter = build_method_adapter(base, tmp_path / "adapter", "VBLORA", target_modules=["q_proj"], r=2, **SMALL)
    edit_config(adapter, r=3)
    with pytest.raises(IncompatibleError) as e:
        merge(base, adapter, tmp_path / "merged", progress=False)
    assert str(e.value).splitlines()[0] == (
        "Shape mismatch for `model.layers.0.self_attn.q_proj.weight`: the base tensor is [16, 16], but the adapter's "
        "vblora_logits_A is [2, 2, 16], while PEFT builds it [3, 2, 16] for a layer of 16 outputs and 16 inputs."
    )


@pytest.mark.parametrize(("saved", "said"), [(True, False), (False, True)])
def test_refuses_a_save_only_topk_weights_the_file_does_not_follow(
    saved: bool, said: bool, model_cache, tmp_path: Path
) -> None:
    base = model_cache(LLAMA)
    adapter = build_method_adapter(base, tmp_path / "adapter", "VBLORA", target_modules=["q_proj"], r=2,
                                   save_only_topk_weights=saved, **SMALL)  # fmt: skip
    edit_config(adapter, save_only_topk_weights=said)
    with pytest.raises(AdapterError) as e:
        merge(base, adapter, tmp_path / "merged", progress=False)
    what = "the top-k weights only" if saved else "full logits"
    assert str(e.value).splitlines()[0] == (
        f"`{adapter}`: the VB-LoRA module `model.layers.0.self_attn.q_proj` has {what}, but `save_only_topk_weights` "
        f"is {'true' if said else 'false'}, so PEFT cannot load it."
    )


def test_shape_problems_in_words() -> None:
    method = method_of("VBLORA")
    assert method is not None

    @dataclass(frozen=True)
    class Info:
        name: str
        shape: tuple[int, ...]

    tensors = {
        "vblora_logits_A": Info("a", (2, 2, 16)),
        "vblora_logits_B": Info("b", (6, 2, 16)),
        "base_model.vblora_vector_bank": Info("v", (16, 8)),
    }
    m = method.module("h.0.attn.c_attn", tensors, {"r": 2, **SMALL}, Path("a"))
    assert method.shape_problem(m, "weight", (16, 48), True) is None  # Conv1D: (in, out)
    conv = method.shape_problem(m, "weight", (48, 16, 1, 1), False)
    assert isinstance(conv, Unsupported)
    assert conv == "VB-LoRA on a 4-D weight is not merged (PEFT's VB-LoRA adapts only Linear and Conv1D layers)"
    with pytest.raises(AdapterError, match=r"has only base_model.vblora_vector_bank, vblora_logits_A, not all"):
        method.module("q", {k: v for k, v in tensors.items() if k != "vblora_logits_B"}, {}, Path("a"))
