"""PEANuT against PEFT: each output tensor bit-identical to ``merge_and_unload()`` on CPU, on fp32, bf16 and fp16
bases (depth 0 and deeper, several activations, scaling, a bf16 adapter); the merged folder loaded with plain
transformers behaves as PEFT's unmerged model; ``verify`` passes the merge and fails a doubled one; and what loraship
refuses.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import LLAMA, QWEN2
from methods.harness import DTYPES, check_behaves_like_peft, check_bit_identical, check_verify_catches_double_merge
from methods.harness import Case as MethodCase

from loraship.engine.merge import merge
from loraship.errors import IncompatibleError, UnsupportedError
from loraship.methods.base import method_of
from loraship.tiny import build_method_adapter

ATTN_MLP = ["q_proj", "k_proj", "up_proj", "down_proj"]


class Case(MethodCase):
    peft_type = "PEANUT"


CASES = [
    Case("peanut", {"target_modules": ATTN_MLP, "r": 4}, LLAMA),
    Case("peanut-depth-2", {"target_modules": ATTN_MLP, "r": 4, "depth": 2, "scaling": 0.5}, LLAMA),
    Case("peanut-gelu", {"target_modules": ATTN_MLP, "r": 3, "depth": 1, "act_fn": "gelu"}, LLAMA),
    Case("peanut-silu", {"target_modules": ATTN_MLP, "r": 2, "depth": 3, "act_fn": "silu", "scaling": 2.0}, LLAMA),
    Case("peanut-tanh", {"target_modules": ATTN_MLP, "r": 2, "depth": 1, "act_fn": "tanh"}, LLAMA),
    Case("peanut-gelu-new", {"target_modules": ATTN_MLP, "r": 2, "depth": 1, "act_fn": "gelu_new"}, LLAMA),
    Case("peanut-gelu-tanh", {"target_modules": ["o_proj"], "r": 2, "depth": 1, "act_fn": "gelu_pytorch_tanh"}, LLAMA),
    Case("peanut-quick-gelu", {"target_modules": ["o_proj"], "r": 2, "act_fn": "quick_gelu"}, LLAMA),
    Case("peanut-leaky-relu", {"target_modules": ["o_proj"], "r": 2, "depth": 1, "act_fn": "leaky_relu"}, LLAMA),
    Case("peanut-adapter-bf16", {"target_modules": ["q_proj", "o_proj"], "r": 2, "depth": 1}, LLAMA,
         adapter_dtype="bfloat16"),
    Case("peanut-bias", {"target_modules": ["q_proj", "v_proj"], "r": 2, "depth": 1}, QWEN2),
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
    adapter = build_method_adapter(base, tmp_path / "adapter", "PEANUT", target_modules=["q_proj"], r=4, depth=2,
                                   act_fn="gelu", scaling=0.5)  # fmt: skip
    result = merge(base, adapter, tmp_path / "merged", progress=False)
    modules = result.prepared.adapter.method_modules
    method = method_of("PEANUT")
    assert method is not None and method.kind == "multiplicative"
    assert {method.describe(m) for m in modules} == {"PEANuT r=4 depth=2 gelu x0.5"}
    assert method.summary(modules) == "r = 4, depth = 2, gelu, scaling = 0.5"


def test_refuses_an_activation_it_does_not_reproduce(model_cache, tmp_path: Path) -> None:
    base = model_cache(LLAMA)
    adapter = build_method_adapter(base, tmp_path / "adapter", "PEANUT", target_modules=["q_proj"], r=2, act_fn="mish")
    with pytest.raises(UnsupportedError) as e:
        merge(base, adapter, tmp_path / "merged", progress=False)
    assert (e.value.message, e.value.fix) == (
        f"`{adapter}` is a PEANuT adapter with act_fn = 'mish', an activation loraship does not reproduce (it merges "
        "PEANuT with relu, gelu, gelu_new, gelu_fast, gelu_pytorch_tanh, quick_gelu, silu, swish, tanh, sigmoid, "
        "leaky_relu, linear).",
        "Merge it with PEFT itself: PeftModel.from_pretrained(base, adapter).merge_and_unload(), then check the "
        "result with `loraship verify`.",
    )
    assert not (tmp_path / "merged").exists()


def test_refuses_a_base_of_other_width(model_cache, tmp_path: Path) -> None:
    base = model_cache(LLAMA)
    adapter = build_method_adapter(base, tmp_path / "adapter", "PEANUT", target_modules=["q_proj"], r=2)
    wider = model_cache({**LLAMA, "hidden_size": 32})
    with pytest.raises(IncompatibleError, match=r"the adapter's peanut_A \[2, 16\] needs a layer with 16 output"):
        merge(wider, adapter, tmp_path / "merged", progress=False)


def test_refuses_tensors_that_do_not_match_the_depth(model_cache, tmp_path: Path) -> None:
    from loraship.errors import AdapterError

    base = model_cache(LLAMA)
    adapter = build_method_adapter(base, tmp_path / "adapter", "PEANUT", target_modules=["q_proj"], r=2, depth=1)
    path = adapter / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "depth": 2}))
    with pytest.raises(AdapterError, match=r"the PEANuT \(depth 2\) module `model\.layers\.0\.self_attn\.q_proj` has "
                       r"only peanut_A\.weight, peanut_B\.weight, peanut_decoders\.0\.weight"):  # fmt: skip
        merge(base, adapter, tmp_path / "merged", progress=False)
