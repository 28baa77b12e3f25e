"""RandLoRA against PEFT: each output tensor bit-identical to ``merge_and_unload()`` on CPU, on fp32, bf16 and fp16
bases (layers of different sizes and of both orientations, GPT-2's Conv1D; bases saved, or drawn again from
``projection_prng_key`` dense, sparse and very sparse; a bf16 adapter); the merged folder loaded with plain
transformers behaves as PEFT's unmerged model; verify passes a correct merge and fails a doubled one; and what
loraship refuses.
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

#: q_proj 16 x 16, v_proj 8 x 16 (fewer outputs than inputs), up_proj 24 x 16, down_proj 16 x 24.
ATTN_MLP = ["q_proj", "v_proj", "up_proj", "down_proj"]
SEEDED = {"save_projection": False, "projection_prng_key": 11}


class Case(MethodCase):
    peft_type = "RANDLORA"


CASES = [
    Case("randlora-saved", {"target_modules": ATTN_MLP, "r": 4}, LLAMA),
    Case("randlora-seeded", {"target_modules": ATTN_MLP, "r": 5, **SEEDED}, LLAMA),
    Case("randlora-sparse", {"target_modules": ATTN_MLP, "r": 3, "sparse": True, **SEEDED}, LLAMA),
    Case("randlora-very-sparse", {"target_modules": ATTN_MLP, "r": 4, "very_sparse": True, **SEEDED}, LLAMA),
    Case("randlora-saved-sparse", {"target_modules": ATTN_MLP, "r": 4, "sparse": True, "randlora_alpha": 3}, LLAMA),
    Case("randlora-gpt2", {"target_modules": ["c_attn", "c_fc", "c_proj"], "r": 4}, GPT2),
    Case("randlora-gpt2-seeded", {"target_modules": ["c_attn", "c_proj"], "r": 6, **SEEDED}, GPT2),
    Case("randlora-adapter-bf16", {"target_modules": ATTN_MLP, "r": 4}, LLAMA, adapter_dtype="bfloat16"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bit_identical_to_peft(case: Case, dtype: str, model_cache, tmp_path: Path) -> None:
    check_bit_identical(case, dtype, model_cache, tmp_path)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_merged_folder_behaves_like_base_plus_adapter(case: Case, model_cache, tmp_path: Path) -> None:
    check_behaves_like_peft(case, model_cache, tmp_path)


def test_verify_passes_a_correct_merge_and_fails_a_doubled_one(model_cache, tmp_path: Path) -> None:
    case = Case("verify", {"target_modules": ["q_proj", "down_proj"], "r": 4, "randlora_alpha": 8}, LLAMA)
    check_verify_catches_double_merge(case, model_cache, tmp_path, changed=4)


def test_plan_and_card_words(model_cache, tmp_path: Path) -> None:
    base = model_cache(LLAMA)
    adapter = build_method_adapter(base, tmp_path / "adapter", "RANDLORA", target_modules=["q_proj"], r=4,
                                   sparse=True, **SEEDED)  # fmt: skip
    result = merge(base, adapter, tmp_path / "merged", progress=False)
    modules = result.prepared.adapter.method_modules
    method = method_of("RANDLORA")
    assert method is not None
    assert {method.describe(m) for m in modules} == {"RandLoRA sparse r=4 scaling=160, bases from seed 11"}
    assert method.summary(modules) == "r = 4, randlora_alpha = 640, projection_prng_key = 11"


def test_refuses_missing_saved_bases(model_cache, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    base = model_cache(LLAMA)
    adapter = build_method_adapter(base, tmp_path / "adapter", "RANDLORA", target_modules=["q_proj"], r=4)
    path = adapter / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(str(path)).items() if k != "base_model.randlora_B"}, str(path))
    with pytest.raises(AdapterError) as e:
        merge(base, adapter, tmp_path / "merged", progress=False)
    assert str(e.value).splitlines()[0] == (
        f"`{adapter}` sets `save_projection` to true, but the adapter file lacks `base_model.randlora_B`: PEFT "
        "refuses to load such a RandLoRA adapter."
    )


def test_refuses_saved_bases_the_config_says_are_drawn(model_cache, tmp_path: Path) -> None:
    base = model_cache(LLAMA)
    adapter = build_method_adapter(base, tmp_path / "adapter", "RANDLORA", target_modules=["q_proj"], r=4)
    edit_config(adapter, save_projection=False)
    with pytest.raises(AdapterError) as e:
        merge(base, adapter, tmp_path / "merged", progress=False)
    assert str(e.value).splitlines()[0] == (
        f"`{adapter}` sets `save_projection` to false, but the adapter file holds RandLoRA bases: PEFT would ignore "
        "them and draw the bases again from `projection_prng_key`, so which ones the adapter was trained with is "
        "unclear."
    )


def test_refuses_a_rank_the_adapter_was_not_trained_with(model_cache, tmp_path: Path) -> None:
    base = model_cache(LLAMA)
    adapter = build_method_adapter(base, tmp_path / "adapter", "RANDLORA", target_modules=["q_proj"], r=4, **SEEDED)
    edit_config(adapter, r=8)
    with pytest.raises(IncompatibleError) as e:
        merge(base, adapter, tmp_path / "merged", progress=False)
    assert str(e.value).splitlines()[0] == (
        "Shape mismatch for `model.layers.0.self_attn.q_proj.weight`: the base tensor is [16, 16], but the adapter's "
        "randlora_lambda is [4, 4], while PEFT builds it [8, 2] for a layer of 16 outputs and 16 inputs with r = 8."
    )


def test_refuses_saved_bases_of_other_sizes(model_cache, tmp_path: Path) -> None:
    base = model_cache(LLAMA)
    adapter = build_method_adapter(base, tmp_path / "adapter", "RANDLORA", target_modules=["q_proj", "up_proj"], r=4)
    narrower = model_cache({**LLAMA, "intermediate_size": 16})
    with pytest.raises(IncompatibleError) as e:
        merge(narrower, adapter, tmp_path / "merged", progress=False)
    assert str(e.value).splitlines()[0] == (
        "Shape mismatch for `model.layers.0.mlp.up_proj.weight`: the base tensor is [16, 16], but the adapter's "
        "base_model.randlora_B is [24, 4, 4], while PEFT builds it [16, 4, 4] for the largest layers this base has "
        "where the adapter applies (16 outputs, 16 inputs, r = 4)."
    )


def test_shape_problems_in_words() -> None:
    method = method_of("RANDLORA")
    assert method is not None

    @dataclass(frozen=True)
    class Info:
        name: str
        shape: tuple[int, ...]

    tensors = {"randlora_lambda": Info("l", (4, 4)), "randlora_gamma": Info("g", (4, 16))}
    m = method.module("h.0.attn.c_attn", tensors, {"r": 4, "save_projection": False}, Path("a"))
    m = method.with_layers(m, (("h.0.attn.c_attn", 48, 16), ("h.0.mlp.c_fc", 64, 16)))
    assert method.shape_problem(m, "weight", (16, 48), True) is None  # Conv1D: (in, out)
    conv = method.shape_problem(m, "weight", (48, 16, 1, 1), False)
    assert isinstance(conv, Unsupported)
    assert conv == "RandLoRA on a 4-D weight is not merged (PEFT's RandLoRA adapts only Linear and Conv1D layers)"
    with pytest.raises(AdapterError, match=r"has only randlora_gamma, not all the tensors RandLoRA saves"):
        method.module("q", {"randlora_gamma": Info("x", (3,))}, {}, Path("a"))
