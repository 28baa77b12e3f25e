"""DeLoRA against PEFT: each output tensor bit-identical to ``merge_and_unload()`` on CPU, on fp32, bf16 and fp16
bases (PEFT's default λ and others through ``lambda_pattern``, ``rank_pattern``, B zero- or randomly initialised,
a row of A small enough for PEFT's 1e-4 norm clamp, attention biases left alone, a bf16 adapter); the merged folder
loaded with plain transformers behaves as PEFT's unmerged model; ``verify``; and what loraship refuses.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import LLAMA, QWEN2
from methods.harness import DTYPES, check_behaves_like_peft, check_bit_identical, check_verify_catches_double_merge
from methods.harness import Case as MethodCase
from safetensors.torch import load_file, save_file

from loraship.engine.merge import merge
from loraship.errors import AdapterError, IncompatibleError
from loraship.methods.base import method_of
from loraship.tiny import build_method_adapter

ATTN_MLP = ["q_proj", "v_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class Case(MethodCase):
    peft_type = "DELORA"

    tiny_row: bool = False  # delora_A's first row scaled to norms below PEFT's 1e-4 clamp

    def adapter(self, base: Path, folder: Path, **override: Any) -> Path:
        super().adapter(base, folder, **override)
        if self.tiny_row:
            path = folder / "adapter_model.safetensors"
            tensors = load_file(str(path))
            for key, t in tensors.items():
                if key.endswith(".delora_A"):
                    t[0] *= 1e-7
            save_file(tensors, str(path))
        return folder


CASES = [
    Case("delora", {"target_modules": ATTN_MLP, "r": 4}, LLAMA),
    Case(
        "delora-patterns",
        {
            "target_modules": ATTN_MLP,
            "r": 4,
            "delora_lambda": 3,
            "rank_pattern": {"q_proj": 2},
            "lambda_pattern": {"down_proj": 40},
            "init_weights": False,
        },
        LLAMA,
    ),
    Case("delora-clamped-norm", {"target_modules": ["q_proj", "up_proj"], "r": 2}, LLAMA, tiny_row=True),
    Case("delora-bias", {"target_modules": ["q_proj", "k_proj"], "r": 2, "init_weights": False}, QWEN2),
    Case("delora-adapter-bf16", {"target_modules": ["q_proj", "o_proj"], "r": 2}, LLAMA, adapter_dtype="bfloat16"),
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
    adapter = build_method_adapter(base, tmp_path / "adapter", "DELORA", target_modules=["q_proj", "v_proj"], r=4,
                                   rank_pattern={"v_proj": 2})  # fmt: skip
    result = merge(base, adapter, tmp_path / "merged", progress=False)
    modules = result.prepared.adapter.method_modules
    method = method_of("DELORA")
    assert method is not None and method.kind == "additive"
    assert {method.describe(m) for m in modules} == {"DeLoRA r=4", "DeLoRA r=2"}
    assert method.summary(modules) == "r = 2–4 (λ and the column norms as trained and saved)"


def test_refuses_a_base_of_other_width(model_cache, tmp_path: Path) -> None:
    base = model_cache(LLAMA)
    adapter = build_method_adapter(base, tmp_path / "adapter", "DELORA", target_modules=["q_proj"], r=2)
    wider = model_cache({**LLAMA, "hidden_size": 32})
    with pytest.raises(IncompatibleError) as e:
        merge(wider, adapter, tmp_path / "merged", progress=False)
    assert e.value.message == (
        "Shape mismatch for `model.layers.0.self_attn.q_proj.weight`: the base tensor is [32, 32], but the adapter's "
        "delora_B [16, 2] @ delora_A [2, 16] makes [16, 16]."
    )


def test_refuses_tensors_that_do_not_match_r(model_cache, tmp_path: Path) -> None:
    base = model_cache(LLAMA)
    adapter = build_method_adapter(base, tmp_path / "adapter", "DELORA", target_modules=["q_proj"], r=2)
    path = adapter / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "r": 3}))
    with pytest.raises(AdapterError) as e:
        merge(base, adapter, tmp_path / "merged", progress=False)
    assert e.value.message == (
        f"`{adapter}`: the DeLoRA module `model.layers.0.self_attn.q_proj` has delora_A [2, 16], delora_B [16, 2], "
        "delora_lambda [1] and delora_w_norm [16], but with r = 3 PEFT makes them (r, in), (out, r), (1) and (in) and "
        "cannot load them."
    )


def test_shape_problems_in_words() -> None:
    method = method_of("DELORA")
    assert method is not None

    @dataclass(frozen=True)
    class Info:
        name: str
        shape: tuple[int, ...]

    tensors = {"delora_A": Info("a", (2, 4)), "delora_B": Info("b", (8, 2)), "delora_lambda": Info("l", (1,)),
               "delora_w_norm": Info("n", (4,))}  # fmt: skip
    m = method.module("q", tensors, {"r": 2}, Path("a"))
    assert method.shape_problem(m, "weight", (8, 4), False) is None
    assert method.shape_problem(m, "weight", (4, 8), True) == (
        "DeLoRA on a Conv1D layer (weights stored (in, out)) is not merged (PEFT's DeLoRA adapts only Linear layers)"
    )
    assert method.shape_problem(m, "weight", (8, 4, 1, 1), False) == (
        "DeLoRA on a 4-D weight is not merged (PEFT's DeLoRA adapts only Linear layers)"
    )
