"""TinyLoRA against PEFT: each output tensor bit-identical to ``merge_and_unload()`` on CPU, on fp32, bf16 and fp16
bases (layers of different sizes over two decoder layers, so each layer's number in the model's order picks its
projection seed and its group of v; weight tying; projections saved or drawn from ``projection_seed``; GPT-2's Conv1D;
an embedding; a bf16 adapter); the merged folder loaded with plain transformers behaves as PEFT's unmerged model;
verify passes a correct merge and fails a doubled one; and what loraship refuses.
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
DRAWN = {"save_projection": False, "projection_seed": 5}


class Case(MethodCase):
    peft_type = "TINYLORA"


CASES = [
    Case("tinylora-saved", {"target_modules": ATTN_MLP, "r": 2}, LLAMA),
    Case("tinylora-drawn", {"target_modules": ATTN_MLP, "r": 3, "u": 16, **DRAWN}, LLAMA),
    Case("tinylora-tied-groups", {"target_modules": ATTN_MLP, "r": 2, "u": 8, "weight_tying": 0.5, **DRAWN}, LLAMA),
    Case("tinylora-one-group", {"target_modules": ATTN_MLP, "r": 4, "u": 8, "weight_tying": 1.0}, LLAMA),
    Case("tinylora-embedding", {"target_modules": ["embed_tokens", "o_proj"], "r": 2, "u": 8, **DRAWN}, LLAMA),
    Case("tinylora-gpt2", {"target_modules": ["c_attn", "c_fc", "c_proj"], "r": 2, "u": 8}, GPT2),
    Case("tinylora-gpt2-drawn", {"target_modules": ["c_attn", "c_proj"], "r": 3, "u": 8, **DRAWN}, GPT2),
    Case("tinylora-adapter-bf16", {"target_modules": ATTN_MLP, "r": 2, "u": 8}, LLAMA, adapter_dtype="bfloat16"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bit_identical_to_peft(case: Case, dtype: str, model_cache, tmp_path: Path) -> None:
    check_bit_identical(case, dtype, model_cache, tmp_path)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_merged_folder_behaves_like_base_plus_adapter(case: Case, model_cache, tmp_path: Path) -> None:
    check_behaves_like_peft(case, model_cache, tmp_path)


def test_verify_passes_a_correct_merge_and_fails_a_doubled_one(model_cache, tmp_path: Path) -> None:
    case = Case("verify", {"target_modules": ["q_proj", "down_proj"], "r": 2, "u": 8, **DRAWN}, LLAMA)
    check_verify_catches_double_merge(case, model_cache, tmp_path, changed=4)


def test_plan_and_card_words(model_cache, tmp_path: Path) -> None:
    base = model_cache(LLAMA)
    adapter = build_method_adapter(base, tmp_path / "adapter", "TINYLORA", target_modules=["q_proj"], r=2, u=8,
                                   **DRAWN)  # fmt: skip
    result = merge(base, adapter, tmp_path / "merged", progress=False)
    modules = result.prepared.adapter.method_modules
    method = method_of("TINYLORA")
    assert method is not None
    assert {method.describe(m) for m in modules} == {"TinyLoRA r=2 u=8, projection from seed 5+layer"}
    assert method.summary(modules) == "r = 2, u = 8, weight_tying = 0, tinylora_v vectors = 2"


def test_refuses_vectors_the_weight_tying_does_not_make(model_cache, tmp_path: Path) -> None:
    base = model_cache(LLAMA)
    adapter = build_method_adapter(base, tmp_path / "adapter", "TINYLORA", target_modules=["q_proj"], r=2, u=8)
    edit_config(adapter, weight_tying=1.0)
    with pytest.raises(IncompatibleError) as e:
        merge(base, adapter, tmp_path / "merged", progress=False)
    assert str(e.value).splitlines()[0] == (
        "Shape mismatch for `model.layers.0.self_attn.q_proj.weight`: the base tensor is [16, 16], but the adapter "
        "saves 2 tinylora_v vectors, while its weight_tying = 1 over the 2 layers it changes in this base makes PEFT "
        "build 1."
    )


def test_refuses_a_rank_the_factors_do_not_have(model_cache, tmp_path: Path) -> None:
    base = model_cache(LLAMA)
    adapter = build_method_adapter(base, tmp_path / "adapter", "TINYLORA", target_modules=["q_proj"], r=2, u=8)
    edit_config(adapter, r=3)
    with pytest.raises(IncompatibleError) as e:
        merge(base, adapter, tmp_path / "merged", progress=False)
    assert str(e.value).splitlines()[0] == (
        "Shape mismatch for `model.layers.0.self_attn.q_proj.weight`: the base tensor is [16, 16], but the adapter's "
        "tinylora_A is [2, 16], while PEFT builds it [3, 16] for a layer of 16 outputs and 16 inputs (r = 3, u = 8)."
    )


def test_refuses_a_saved_projection_the_config_says_is_drawn(model_cache, tmp_path: Path) -> None:
    base = model_cache(LLAMA)
    adapter = build_method_adapter(base, tmp_path / "adapter", "TINYLORA", target_modules=["q_proj"], r=2, u=8)
    edit_config(adapter, save_projection=False)
    with pytest.raises(AdapterError) as e:
        merge(base, adapter, tmp_path / "merged", progress=False)
    assert str(e.value).splitlines()[0] == (
        f"`{adapter}` sets `save_projection` to false, but the TinyLoRA module `model.layers.0.self_attn.q_proj` "
        "holds tinylora_P: PEFT would ignore it and draw the projection again from `projection_seed`, so which one the "
        "adapter was trained with is unclear."
    )


def test_shape_problems_in_words() -> None:
    method = method_of("TINYLORA")
    assert method is not None

    @dataclass(frozen=True)
    class Info:
        name: str
        shape: tuple[int, ...]

    tensors = {"tinylora_A": Info("a", (2, 16)), "tinylora_B": Info("b", (48, 2)),
               "base_model.tinylora_v.0": Info("v", (8,))}  # fmt: skip
    m = method.module("h.0.attn.c_attn", tensors, {"r": 2, "u": 8, "save_projection": False}, Path("a"))
    m = method.with_layers(m, (("h.0.attn.c_attn", 48, 16),))
    assert method.shape_problem(m, "weight", (16, 48), True) is None  # Conv1D: (in, out)
    conv = method.shape_problem(m, "weight", (48, 16, 1, 1), False)
    assert isinstance(conv, Unsupported)
    assert conv == (
        "TinyLoRA on a 4-D weight is not merged (PEFT's TinyLoRA adapts only Linear, Conv1D and Embedding layers)"
    )
    # the model class could not be built: the checkpoint's order of layers may not be the model's
    unordered = method.with_layers(m, (("h.0.attn.c_attn", 48, 16),), ordered=False)
    refused = method.shape_problem(unordered, "weight", (16, 48), True)
    assert isinstance(refused, Unsupported)
    assert refused == (
        "TinyLoRA is not merged here: which tinylora_v vector and projection seed a layer gets follows its number in "
        "the model's order of modules, and loraship could not build the model class to read that order"
    )
    saved = method.module("h.0.attn.c_attn", {**tensors, "tinylora_P": Info("p", (8, 2, 2))}, {"r": 2, "u": 8},
                          Path("a"))  # fmt: skip
    one_group = method.with_layers(saved, (("h.0.attn.c_attn", 48, 16),), ordered=False)
    assert method.shape_problem(one_group, "weight", (16, 48), True) is None  # one v, saved projections: no order
