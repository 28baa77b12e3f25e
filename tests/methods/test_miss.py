"""MiSS against PEFT: each output tensor bit-identical to ``merge_and_unload()`` on CPU, on fp32, bf16 and fp16
bases (balance, mini and bat, with ``r`` dividing the input features and not (balance and mini; PEFT's bat needs it
to), the block zero-initialised or random, attention biases left alone, a bf16 adapter); the merged folder loaded
with plain transformers behaves as PEFT's unmerged model; ``verify``; and what loraship refuses.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import LLAMA, QWEN2
from methods.harness import (
    DTYPES,
    check_behaves_like_peft,
    check_bit_identical,
    check_verify_catches_double_merge,
    edit_config,
)
from methods.harness import Case as MethodCase

from loraship.engine.merge import merge
from loraship.errors import AdapterError, IncompatibleError, UnsupportedError
from loraship.methods.base import method_of
from loraship.tiny import build_method_adapter

ATTN_MLP = ["q_proj", "v_proj", "up_proj", "down_proj"]
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]


class Case(MethodCase):
    peft_type = "MISS"


CASES = [
    Case("miss-balance", {"target_modules": ATTN_MLP, "r": 4}, LLAMA),
    Case("miss-balance-random-init", {"target_modules": ATTN_MLP, "r": 2, "init_weights": False}, LLAMA),
    Case("miss-balance-r-not-dividing", {"target_modules": ATTN_MLP, "r": 5}, LLAMA),  # 16 % 5, 24 % 5
    Case("miss-mini", {"target_modules": ATTN_MLP, "r": 4, "init_weights": "mini", "mini_r": 4}, LLAMA),
    Case("miss-mini-r-not-dividing", {"target_modules": ATTN, "r": 3, "init_weights": "mini", "mini_r": 8}, LLAMA),
    Case("miss-bat", {"target_modules": ATTN_MLP, "r": 4, "init_weights": "bat"}, LLAMA),
    Case("miss-bat-r-8", {"target_modules": ["q_proj", "o_proj", "k_proj"], "r": 8, "init_weights": "bat"}, LLAMA),
    Case("miss-bias", {"target_modules": ["q_proj", "v_proj"], "r": 4, "init_weights": "bat"}, QWEN2),
    Case("miss-adapter-bf16", {"target_modules": ["q_proj", "o_proj"], "r": 4}, LLAMA, adapter_dtype="bfloat16"),
    Case(
        "miss-bat-adapter-bf16",
        {"target_modules": ["q_proj", "o_proj"], "r": 4, "init_weights": "bat"},
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


@pytest.mark.parametrize("case", [CASES[0], CASES[5]], ids=lambda c: c.id)
def test_verify_passes_a_correct_merge_and_fails_a_doubled_one(case: Case, model_cache, tmp_path: Path) -> None:
    check_verify_catches_double_merge(case, model_cache, tmp_path)


def test_plan_and_card_words(model_cache, tmp_path: Path) -> None:
    base = model_cache(LLAMA)
    adapter = build_method_adapter(
        base, tmp_path / "adapter", "MISS", target_modules=["q_proj"], r=4, init_weights="mini", mini_r=2
    )
    result = merge(base, adapter, tmp_path / "merged", progress=False)
    modules = result.prepared.adapter.method_modules
    method = method_of("MISS")
    assert method is not None and method.kind == "multiplicative"
    assert {method.describe(m) for m in modules} == {"MiSS mini r=4, mini_r=2"}
    assert method.summary(modules) == "mini, r = 4"


def test_refuses_a_base_of_other_width(model_cache, tmp_path: Path) -> None:
    base = model_cache(LLAMA)
    adapter = build_method_adapter(base, tmp_path / "adapter", "MISS", target_modules=["q_proj"], r=4)
    wider = model_cache({**LLAMA, "hidden_size": 32})
    with pytest.raises(IncompatibleError) as e:
        merge(wider, adapter, tmp_path / "merged", progress=False)
    assert e.value.message == (
        "Shape mismatch for `model.layers.0.self_attn.q_proj.weight`: the base tensor is [32, 32], but the adapter's "
        "miss_block [4, 16] is not the [4, 32] PEFT makes for MiSS balance with r = 4 on 32 output and 32 input "
        "features."
    )


def test_refuses_a_block_of_another_mode(model_cache, tmp_path: Path) -> None:
    base = model_cache(LLAMA)
    adapter = build_method_adapter(base, tmp_path / "adapter", "MISS", target_modules=["q_proj"], r=4)
    edit_config(adapter, init_weights="bat")
    with pytest.raises(AdapterError) as e:
        merge(base, adapter, tmp_path / "merged", progress=False)
    assert e.value.message == (
        f"`{adapter}`: the MiSS module `model.layers.0.self_attn.q_proj` has a 2-D miss_block, but PEFT makes it 3-D "
        "for init_weights = 'bat' and cannot load it."
    )


def test_refuses_an_unknown_init(model_cache, tmp_path: Path) -> None:
    base = model_cache(LLAMA)
    adapter = build_method_adapter(base, tmp_path / "adapter", "MISS", target_modules=["q_proj"], r=4)
    edit_config(adapter, init_weights="pissa")
    with pytest.raises(AdapterError, match=r'sets `init_weights` to "pissa", but PEFT expects true, false, "bat"'):
        merge(base, adapter, tmp_path / "merged", progress=False)


def test_bone_refused_as_peft_no_longer_loads_it(model_cache, tmp_path: Path) -> None:
    """BONE is MiSS's old name; PEFT 0.21 has no BONE type, so there is no PEFT merge to match."""
    base = model_cache(LLAMA)
    adapter = build_method_adapter(base, tmp_path / "adapter", "MISS", target_modules=["q_proj"], r=4)
    edit_config(adapter, peft_type="BONE")
    with pytest.raises(UnsupportedError, match=r"BONE"):
        merge(base, adapter, tmp_path / "merged", progress=False)


def test_shape_problems_in_words() -> None:
    """What PEFT's MiSS does not adapt or refuses to build."""
    method = method_of("MISS")
    assert method is not None

    @dataclass(frozen=True)
    class Info:
        name: str
        shape: tuple[int, ...]

    bat = method.module("q", {"miss_block": Info("b", (4, 3, 3))}, {"r": 3, "init_weights": "bat"}, Path("a"))
    assert method.shape_problem(bat, "weight", (12, 9), False) is None
    assert method.shape_problem(bat, "weight", (12, 10), False) == (
        "PEFT's MiSS bat needs r = 3 to divide the layer's 12 x 10 weight"
    )
    mini = method.module("q", {"miss_block": Info("b", (4, 3))}, {"r": 4, "init_weights": "mini", "mini_r": 3},
                         Path("a"))  # fmt: skip
    assert method.shape_problem(mini, "weight", (12, 10), False) is None
    assert method.shape_problem(mini, "weight", (10, 10), False) == (
        "PEFT's MiSS mini needs mini_r = 3 to divide the layer's 10 output features"
    )
    assert method.shape_problem(mini, "weight", (12, 3), False) == (
        "PEFT's MiSS needs r = 4 to be at most the layer's 3 input features"
    )
    assert method.shape_problem(mini, "weight", (10, 12), True) == (
        "MiSS on a Conv1D layer (weights stored (in, out)) is not merged (PEFT's MiSS adapts only Linear layers)"
    )
    assert method.shape_problem(mini, "weight", (12, 4, 1, 1), False) == (
        "MiSS on a 4-D weight is not merged (PEFT's MiSS adapts only Linear layers)"
    )
