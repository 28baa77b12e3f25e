"""DEFT against PEFT: each output tensor bit-identical to ``merge_and_unload()`` on CPU, on fp32, bf16 and fp16
bases (relu and QR projections, alpha scaling, PaRa, r capped at the output features, Conv1D layers, biased layers,
a bf16 adapter); the merged folder loaded with plain transformers behaves as PEFT's unmerged model; ``verify``
passes the merge and fails a doubled one; and what loraship refuses.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import GPT2, LLAMA, QWEN2
from methods.harness import DTYPES, check_behaves_like_peft, check_bit_identical, check_verify_catches_double_merge
from methods.harness import Case as MethodCase

from loraship.engine.merge import merge
from loraship.errors import AdapterError, IncompatibleError
from loraship.methods.base import method_of
from loraship.tiny import build_method_adapter

ATTN_MLP = ["q_proj", "k_proj", "up_proj", "down_proj"]


class Case(MethodCase):
    peft_type = "DEFT"


CASES = [
    Case("deft", {"target_modules": ATTN_MLP, "r": 4}, LLAMA),
    Case("deft-qr", {"target_modules": ATTN_MLP, "r": 4, "decomposition_method": "qr"}, LLAMA),
    Case("deft-alpha", {"target_modules": ATTN_MLP, "r": 4, "alpha": 3}, LLAMA),
    Case("deft-r-capped", {"target_modules": ATTN_MLP, "r": 12, "alpha": 16}, LLAMA),  # k_proj: 8 outputs
    Case("deft-random-init", {"target_modules": ATTN_MLP, "r": 2, "init_weights": False, "init_scale": 3.0}, LLAMA),
    Case("para", {"target_modules": ATTN_MLP, "r": 4, "para": True}, LLAMA),
    Case("para-qr", {"target_modules": ATTN_MLP, "r": 3, "para": True, "decomposition_method": "qr"}, LLAMA),
    Case("deft-adapter-bf16", {"target_modules": ["q_proj", "o_proj"], "r": 2}, LLAMA, adapter_dtype="bfloat16"),
    Case("deft-bias", {"target_modules": ["q_proj", "v_proj"], "r": 2, "alpha": 4}, QWEN2),
    Case("deft-conv1d-gpt2", {"target_modules": ["c_attn", "c_fc"], "r": 2, "fan_in_fan_out": True}, GPT2),
    Case("deft-qr-conv1d-gpt2", {"target_modules": ["c_proj"], "r": 3, "decomposition_method": "qr"}, GPT2),
]


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
    adapter = build_method_adapter(base, tmp_path / "adapter", "DEFT", target_modules=["q_proj", "k_proj"], r=12,
                                   alpha=6)  # fmt: skip
    result = merge(base, adapter, tmp_path / "merged", progress=False)
    modules = result.prepared.adapter.method_modules
    method = method_of("DEFT")
    assert method is not None and method.kind == "multiplicative"
    assert {method.describe(m) for m in modules} == {"DEFT r=12 (relu projection)", "DEFT r=8 (relu projection)"}
    assert method.summary(modules) == "r = 8–12, relu projection, injection scale = 0.5–0.75"
    para = build_method_adapter(base, tmp_path / "para", "DEFT", target_modules=["q_proj"], r=2, para=True,
                                decomposition_method="qr")  # fmt: skip
    modules = merge(base, para, tmp_path / "merged-para", progress=False).prepared.adapter.method_modules
    assert {method.describe(m) for m in modules} == {"PaRa (DEFT, subspace removal only) r=2 (qr projection)"}
    assert method.summary(modules) == "r = 2, qr projection, PaRa (subspace removal only)"


def test_refuses_a_base_of_other_width(model_cache, tmp_path: Path) -> None:
    base = model_cache(LLAMA)
    adapter = build_method_adapter(base, tmp_path / "adapter", "DEFT", target_modules=["q_proj"], r=2)
    wider = model_cache({**LLAMA, "hidden_size": 32})
    with pytest.raises(
        IncompatibleError,
        match=r"the base tensor is \[32, 32\], but the adapter's deft_P \[16, 2\] needs a layer with 16 output "
        r"features\.",
    ):
        merge(wider, adapter, tmp_path / "merged", progress=False)


def test_refuses_tensors_that_do_not_match_the_config(model_cache, tmp_path: Path) -> None:
    base = model_cache(LLAMA)
    adapter = build_method_adapter(base, tmp_path / "adapter", "DEFT", target_modules=["q_proj"], r=2)
    path = adapter / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "r": 3}))
    with pytest.raises(AdapterError) as e:
        merge(base, adapter, tmp_path / "merged", progress=False)
    assert e.value.message == (
        f"`{adapter}`: the DEFT module `model.layers.0.self_attn.q_proj` has deft_P [16, 2] and deft_R [2, 16], but "
        "with r = 3 in its config PEFT makes them (out, r) and (r, in) (r capped at the output features) and cannot "
        "load them."
    )
    path.write_text(json.dumps({**json.loads(path.read_text()), "r": 2, "para": True}))
    with pytest.raises(AdapterError) as e:
        merge(base, adapter, tmp_path / "merged", progress=False)
    assert e.value.message == (
        f"`{adapter}`: the DEFT module `model.layers.0.self_attn.q_proj` has deft_R, but its config sets para = true "
        "(PaRa), for which PEFT makes no deft_R and cannot load it."
    )
