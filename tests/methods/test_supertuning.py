"""SuperTuning against PEFT: each output tensor bit-identical to ``merge_and_unload()`` on CPU, on fp32, bf16 and fp16
bases (places saved or chosen again from the base weight, largest or smallest magnitudes, Supra mode with its LoRA,
a bf16 adapter); the merged folder loaded with plain transformers behaves as PEFT's unmerged model; verify passes a
correct merge and fails a doubled one; and what loraship refuses.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import LLAMA
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
NOT_SAVED = {"save_precomputed_indices": False}


class Case(MethodCase):
    peft_type = "SUPERTUNING"


CASES = [
    Case("supertuning-saved", {"target_modules": ATTN_MLP, "sparsity": 0.9}),
    Case("supertuning-places-from-base", {"target_modules": ATTN_MLP, "sparsity": 0.8, **NOT_SAVED}),
    Case("supertuning-smallest", {"target_modules": ATTN_MLP, "sparsity": 0.95, "select_top": False, **NOT_SAVED}),
    Case("supertuning-supra", {"target_modules": ATTN_MLP, "sparsity": 0.9, "r": 3, "lora_alpha": 6}),
    Case(
        "supertuning-supra-from-base",
        {"target_modules": ["q_proj", "o_proj"], "sparsity": 0.5, "r": 2, "lora_alpha": 3.5, **NOT_SAVED},
    ),
    Case(
        "supertuning-adapter-bf16",
        {"target_modules": ATTN_MLP, "sparsity": 0.9, "r": 2, "lora_alpha": 4},
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
    case = Case("verify", {"target_modules": ["q_proj", "down_proj"], "sparsity": 0.9, "r": 2, "lora_alpha": 4})
    check_verify_catches_double_merge(case, model_cache, tmp_path, changed=4)


def test_plan_and_card_words(model_cache, tmp_path: Path) -> None:
    base = model_cache(LLAMA)
    adapter = build_method_adapter(base, tmp_path / "adapter", "SUPERTUNING", target_modules=["q_proj"],
                                   sparsity=0.9, r=2, lora_alpha=4, **NOT_SAVED)  # fmt: skip
    result = merge(base, adapter, tmp_path / "merged", progress=False)
    modules = result.prepared.adapter.method_modules
    method = method_of("SUPERTUNING")
    assert method is not None
    assert {method.describe(m) for m in modules} == {"SuperTuning sparsity=0.9 + LoRA r=2, places from the base weight"}
    assert method.summary(modules) == "sparsity = 0.9"


def test_refuses_values_the_sparsity_does_not_make(model_cache, tmp_path: Path) -> None:
    base = model_cache(LLAMA)
    adapter = build_method_adapter(base, tmp_path / "adapter", "SUPERTUNING", target_modules=["q_proj"], sparsity=0.9)
    edit_config(adapter, sparsity=0.5)
    with pytest.raises(IncompatibleError) as e:
        merge(base, adapter, tmp_path / "merged", progress=False)
    assert str(e.value).splitlines()[0] == (
        "Shape mismatch for `model.layers.0.self_attn.q_proj.weight`: the base tensor is [16, 16], but the adapter's "
        "supertuning_values has 25 values, while sparsity = 0.5 makes PEFT train 128 of a weight of 16 outputs and 16 "
        "inputs."
    )


def test_refuses_saved_places_the_config_says_are_chosen(model_cache, tmp_path: Path) -> None:
    base = model_cache(LLAMA)
    adapter = build_method_adapter(base, tmp_path / "adapter", "SUPERTUNING", target_modules=["q_proj"], sparsity=0.9)
    edit_config(adapter, save_precomputed_indices=False)
    with pytest.raises(AdapterError) as e:
        merge(base, adapter, tmp_path / "merged", progress=False)
    assert str(e.value).splitlines()[0] == (
        f"`{adapter}` sets `save_precomputed_indices` to false, but the SuperTuning module "
        "`model.layers.0.self_attn.q_proj` holds supertuning_indices: PEFT would ignore them and choose the places "
        "again from the base weight, so which ones the adapter was trained with is unclear."
    )


def test_refuses_a_supra_lora_without_r(model_cache, tmp_path: Path) -> None:
    base = model_cache(LLAMA)
    adapter = build_method_adapter(base, tmp_path / "adapter", "SUPERTUNING", target_modules=["q_proj"], sparsity=0.9,
                                   r=2, lora_alpha=4)  # fmt: skip
    edit_config(adapter, r=None, lora_alpha=None)
    with pytest.raises(AdapterError) as e:
        merge(base, adapter, tmp_path / "merged", progress=False)
    assert str(e.value).splitlines()[0] == (
        f"`{adapter}`: the SuperTuning module `model.layers.0.self_attn.q_proj` holds a Supra-mode LoRA "
        "(supertuning_lora_A/B), but the config sets no `r`, so PEFT cannot load it."
    )


def test_shape_problems_in_words() -> None:
    method = method_of("SUPERTUNING")
    assert method is not None

    @dataclass(frozen=True)
    class Info:
        name: str
        shape: tuple[int, ...]

    tensors = {"supertuning_values": Info("v", (76,)), "supertuning_indices": Info("i", (76,))}
    m = method.module("h.0.attn.c_attn", tensors, {"sparsity": 0.9}, Path("a"))
    assert method.shape_problem(m, "weight", (48, 16), False) is None
    conv1d = method.shape_problem(m, "weight", (16, 48), True)
    assert isinstance(conv1d, Unsupported)
    assert conv1d == "SuperTuning on a Conv1D weight is not merged (PEFT's SuperTuning adapts only nn.Linear layers)"
