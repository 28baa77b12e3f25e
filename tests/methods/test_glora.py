"""GLoRA against PEFT: each output tensor bit-identical to ``merge_and_unload()`` on CPU, on fp32, bf16 and fp16
bases (every A/B path, D/E paths on biased layers, a bf16 adapter); the merged folder loaded with plain transformers
behaves as PEFT's unmerged model; ``verify`` passes the merge and fails a doubled one; and what loraship refuses (a
trained C on a biased layer: its bias reads the base weight).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import LLAMA, QWEN2, load_tensors
from methods.harness import DTYPES, check_behaves_like_peft, check_bit_identical, check_verify_catches_double_merge
from methods.harness import Case as MethodCase

from loraship.engine.merge import merge
from loraship.errors import IncompatibleError, UnsupportedError
from loraship.methods.base import method_of
from loraship.tiny import build_method_adapter

ATTN_MLP = ["q_proj", "v_proj", "up_proj", "down_proj"]
#: Qwen2's q/k/v projections have biases, o_proj and the MLP none.
QWEN_MIX = ["q_proj", "v_proj", "o_proj", "up_proj"]


@dataclass(frozen=True)
class Case(MethodCase):
    peft_type = "GLORA"

    no_op_modules: bool = False  # modules of only none paths: planned, PEFT's values unchanged


CASES = [
    Case("glora", {"target_modules": ATTN_MLP, "r": 4}, LLAMA),
    Case("glora-vector", {"target_modules": ATTN_MLP, "config_A_B": "vector"}, LLAMA),
    Case("glora-constant", {"target_modules": ATTN_MLP, "config_A_B": "constant"}, LLAMA),
    Case(  # the weights as they are, the biases changed
        "glora-none-bias-vector",
        {"target_modules": QWEN_MIX, "config_A_B": "none", "config_C": "none", "config_D_E": "vector"},
        QWEN2,
        no_op_modules=True,  # every weight (A and B none); o_proj and up_proj (no bias) change nothing
    ),
    Case("glora-none", {"target_modules": ATTN_MLP[:2], "config_A_B": "none"}, LLAMA, no_op_modules=True),
    Case("glora-adapter-bf16", {"target_modules": ["q_proj", "o_proj"], "r": 2}, LLAMA, adapter_dtype="bfloat16"),
    Case("glora-bias-constant", {"target_modules": QWEN_MIX, "r": 2, "config_C": "none"}, QWEN2),
    Case(
        "glora-bias-vector",
        {"target_modules": QWEN_MIX, "config_A_B": "vector", "config_C": "none", "config_D_E": "vector"},
        QWEN2,
    ),
    Case(
        "glora-bias-none",
        {"target_modules": QWEN_MIX, "config_A_B": "constant", "config_C": "none", "config_D_E": "none"},
        QWEN2,
    ),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bit_identical_to_peft(case: Case, dtype: str, model_cache, tmp_path: Path) -> None:
    base, _, result, ours = check_bit_identical(case, dtype, model_cache, tmp_path, as_planned=not case.no_op_modules)
    if case.no_op_modules:  # what changes is planned; what is planned and unchanged is a module of none paths
        before = load_tensors(base)
        changed = {n for n, t in ours.items() if not torch.equal(t, before[n])}
        assert changed <= {t.name for t in result.prepared.plan.changed}
        modules = {m.module: m for m in result.prepared.adapter.method_modules}
        for name in {t.name for t in result.prepared.plan.changed} - changed:
            module, _, param = name.rpartition(".")
            assert param == "weight" and modules[module].setting("path_A") == "none", name


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_merged_folder_behaves_like_base_plus_adapter(case: Case, model_cache, tmp_path: Path) -> None:
    check_behaves_like_peft(case, model_cache, tmp_path)


def test_verify_passes_a_correct_merge_and_fails_a_doubled_one(model_cache, tmp_path: Path) -> None:
    check_verify_catches_double_merge(CASES[0], model_cache, tmp_path)


def test_plan_and_card_words(model_cache, tmp_path: Path) -> None:
    base = model_cache(QWEN2)
    adapter = build_method_adapter(base, tmp_path / "adapter", "GLORA", target_modules=["q_proj", "o_proj"], r=4,
                                   config_C="none", config_D_E="vector")  # fmt: skip
    result = merge(base, adapter, tmp_path / "merged", progress=False)
    modules = result.prepared.adapter.method_modules
    method = method_of("GLORA")
    assert method is not None and method.kind == "multiplicative"
    assert {method.describe(m) for m in modules} == {
        "GLoRA A/B lora, C none, D/E vector r=4",
        "GLoRA A/B lora, C none, D/E none r=4",
    }
    assert method.summary(modules) == "A/B lora, C none, D/E none; A/B lora, C none, D/E vector, r = 4"


def test_refuses_a_trained_c_on_a_biased_layer(model_cache, tmp_path: Path) -> None:
    """PEFT's default config_C (lora) couples a biased layer's bias to its weight: b' = b + b*D + E + W @ C."""
    base = model_cache(QWEN2)
    adapter = build_method_adapter(base, tmp_path / "adapter", "GLORA", target_modules=["k_proj"], r=2)
    with pytest.raises(UnsupportedError) as e:
        merge(base, adapter, tmp_path / "merged", progress=False)
    assert (e.value.message, e.value.fix) == (
        "`model.layers.0.self_attn.k_proj.bias`: GLoRA with a trained C (lora path) on a layer with a bias is not "
        "merged by loraship: the merged bias b + b*D + E + W @ C reads the base weight, and loraship merges one base "
        "tensor at a time.",
        "Keep this adapter unmerged (load it with PEFT on top of the base model), or train it without GLoRA on such "
        "layers.",
    )
    assert not (tmp_path / "merged").exists()


def test_refuses_a_base_of_other_width(model_cache, tmp_path: Path) -> None:
    base = model_cache(LLAMA)
    adapter = build_method_adapter(base, tmp_path / "adapter", "GLORA", target_modules=["q_proj"], r=2)
    wider = model_cache({**LLAMA, "hidden_size": 32})
    with pytest.raises(
        IncompatibleError,
        match=r"the adapter's GLoRA paths \(A/B lora, C none, D/E none\) need a weight of \[16, 16\]",
    ):
        merge(wider, adapter, tmp_path / "merged", progress=False)
