"""UniLoRA against PEFT: each output tensor bit-identical to ``merge_and_unload()`` on CPU, on fp32, bf16 and fp16
bases (adapters saved with their indices: layers of different sizes, GPT-2's Conv1D, a bf16 adapter); the merged
folder loaded with plain transformers behaves as PEFT's unmerged model; verify passes a correct merge and fails a
doubled one; and an adapter saved without its indices is refused, word for word.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import GPT2, LLAMA
from methods.harness import DTYPES, check_behaves_like_peft, check_bit_identical, check_verify_catches_double_merge
from methods.harness import Case as MethodCase

from loraship.engine.merge import merge
from loraship.errors import IncompatibleError, UnsupportedError
from loraship.methods.base import Unsupported, method_of
from loraship.tiny import build_method_adapter

ATTN_MLP = ["q_proj", "v_proj", "up_proj", "down_proj"]
SAVED = {"save_indices": True}


class Case(MethodCase):
    peft_type = "UNILORA"


CASES = [
    Case("unilora-r2", {"target_modules": ATTN_MLP, "r": 2, "theta_d_length": 64, **SAVED}, LLAMA),
    Case("unilora-r4", {"target_modules": ATTN_MLP, "r": 4, "theta_d_length": 100, "proj_seed": 7, **SAVED}, LLAMA),
    Case("unilora-gpt2", {"target_modules": ["c_attn", "c_fc"], "r": 2, "theta_d_length": 64, **SAVED}, GPT2),
    Case(
        "unilora-adapter-bf16",
        {"target_modules": ATTN_MLP, "r": 2, "theta_d_length": 64, **SAVED},
        LLAMA,
        adapter_dtype="bfloat16",
    ),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bit_identical_to_peft(case: Case, dtype: str, model_cache, tmp_path: Path) -> None:
    result = check_bit_identical(case, dtype, model_cache, tmp_path).result
    # PEFT's UniLoRA layers cannot be built on the meta device: the names check says so instead of running
    assert result.prepared.names.skipped is not None and "meta device" in result.prepared.names.skipped


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_merged_folder_behaves_like_base_plus_adapter(case: Case, model_cache, tmp_path: Path) -> None:
    check_behaves_like_peft(case, model_cache, tmp_path)


def test_verify_passes_a_correct_merge_and_fails_a_doubled_one(model_cache, tmp_path: Path) -> None:
    case = Case("verify", {"target_modules": ["q_proj", "down_proj"], "r": 2, "theta_d_length": 64, **SAVED}, LLAMA)
    check_verify_catches_double_merge(case, model_cache, tmp_path, changed=4)


def test_plan_and_card_words(model_cache, tmp_path: Path) -> None:
    base = model_cache(LLAMA)
    adapter = build_method_adapter(base, tmp_path / "adapter", "UNILORA", target_modules=["q_proj"], r=2,
                                   theta_d_length=64, **SAVED)  # fmt: skip
    result = merge(base, adapter, tmp_path / "merged", progress=False)
    modules = result.prepared.adapter.method_modules
    method = method_of("UNILORA")
    assert method is not None
    assert {method.describe(m) for m in modules} == {"UniLoRA r=2 over theta_d of 64"}
    assert method.summary(modules) == "r = 2, theta_d_length = 64"


def test_refuses_an_adapter_saved_without_its_indices(model_cache, tmp_path: Path) -> None:
    base = model_cache(LLAMA)
    adapter = build_method_adapter(base, tmp_path / "adapter", "UNILORA", target_modules=["q_proj"], r=2,
                                   theta_d_length=64)  # fmt: skip
    with pytest.raises(UnsupportedError) as e:
        merge(base, adapter, tmp_path / "merged", progress=False)
    assert str(e.value).splitlines()[0] == (
        f"`{adapter / 'adapter_config.json'}` is a UNILORA adapter that loraship does not merge: it was saved without "
        "its indices (save_indices = false), so it holds only the shared theta_d; which layers it changes, and how "
        "PEFT deals the places in theta_d out to them (in the model's order, from proj_seed), depend on matching "
        "target_modules against the model, which loraship does not do for UniLoRA."
    )


def test_refuses_a_rank_the_indices_do_not_have(model_cache, tmp_path: Path) -> None:
    base = model_cache(LLAMA)
    adapter = build_method_adapter(base, tmp_path / "adapter", "UNILORA", target_modules=["q_proj"], r=2,
                                   theta_d_length=64, **SAVED)  # fmt: skip
    path = adapter / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "r": 3}))
    with pytest.raises(IncompatibleError) as e:
        merge(base, adapter, tmp_path / "merged", progress=False)
    assert str(e.value).splitlines()[0] == (
        "Shape mismatch for `model.layers.0.self_attn.q_proj.weight`: the base tensor is [16, 16], but the adapter's "
        "unilora_indices_A is [2, 16], while PEFT builds it [3, 16] for a layer of 16 outputs and 16 inputs (r = 3, "
        "theta_d_length = 64)."
    )


def test_shape_problems_in_words() -> None:
    method = method_of("UNILORA")
    assert method is not None

    @dataclass(frozen=True)
    class Info:
        name: str
        shape: tuple[int, ...]

    tensors = {"unilora_indices_A": Info("a", (2, 16)), "unilora_scales_A": Info("b", (2, 16)),
               "unilora_indices_B": Info("c", (48, 2)), "unilora_scales_B": Info("d", (48, 2)),
               "base_model.unilora_theta_d": Info("t", (64,))}  # fmt: skip
    m = method.module("h.0.attn.c_attn", tensors, {"r": 2, "theta_d_length": 64, **SAVED}, Path("a"))
    assert method.shape_problem(m, "weight", (16, 48), True) is None  # Conv1D: (in, out)
    conv = method.shape_problem(m, "weight", (48, 16, 1, 1), False)
    assert isinstance(conv, Unsupported)
    assert conv == "UniLoRA on a 4-D weight is not merged (PEFT's UniLoRA adapts only Linear and Conv1D layers)"
