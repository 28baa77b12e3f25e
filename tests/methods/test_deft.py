"""DEFT against PEFT: each output tensor bit-identical to ``merge_and_unload()`` on CPU, on fp32, bf16 and fp16
bases (relu and QR projections, alpha scaling, PaRa, r capped at the output features, Conv1D layers, biased layers,
a bf16 adapter); the merged folder loaded with plain transformers behaves as PEFT's unmerged model; ``verify``
passes the merge and fails a doubled one; and what loraship refuses.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import (
    GPT2,
    LLAMA,
    QWEN2,
    assert_changes_as_planned,
    assert_same_tensors,
    load_tensors,
    peft_outputs,
    peft_reference,
    plain_outputs,
)

from loraship.engine.merge import merge
from loraship.errors import AdapterError, IncompatibleError
from loraship.methods.base import method_of
from loraship.tiny import build_method_adapter

ATTN_MLP = ["q_proj", "k_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class Case:
    id: str
    settings: dict[str, Any]
    config: dict[str, Any]
    model_class: str = "AutoModelForCausalLM"
    adapter_dtype: str | None = None
    inputs: str = "tokens"


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
DTYPES = ["float32", "bfloat16", "float16"]


def _inputs(kind: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    if kind == "pixels":
        return {"pixel_values": torch.randn(1, 3, 16, 16, generator=g)}
    if kind == "audio":
        return {"input_values": torch.randn(1, 64, generator=g)}
    return {"input_ids": torch.randint(0, 30, (1, 9), generator=g)}


def _adapter(case: Case, base: Path, folder: Path) -> Path:
    return build_method_adapter(
        base, folder, "DEFT", model_class=case.model_class, adapter_dtype=case.adapter_dtype, **case.settings
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bit_identical_to_peft(case: Case, dtype: str, model_cache, tmp_path: Path) -> None:
    base = model_cache(case.config, model_class=case.model_class, dtype=dtype)
    adapter = _adapter(case, base, tmp_path / "adapter")
    result = merge(base, adapter, tmp_path / "merged", progress=False)
    reference = peft_reference(
        base, adapter, tmp_path / "peft", model_class=case.model_class, dtype=getattr(torch, dtype)
    )
    ours = load_tensors(tmp_path / "merged")
    untouched = frozenset(t.name for t in result.prepared.plan.tensors if not t.changed)
    assert_same_tensors(ours, reference, upcast_ok=untouched)
    assert_changes_as_planned(result.prepared.plan, ours, base)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_merged_folder_behaves_like_base_plus_adapter(case: Case, model_cache, tmp_path: Path) -> None:
    base = model_cache(case.config, model_class=case.model_class, dtype="float32")
    adapter = _adapter(case, base, tmp_path / "adapter")
    merge(base, adapter, tmp_path / "merged", progress=False)
    inputs = _inputs(case.inputs)
    expected = peft_outputs(base, adapter, inputs, model_class=case.model_class)
    actual = plain_outputs(tmp_path / "merged", inputs, model_class=case.model_class)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


def test_verify_passes_a_correct_merge_and_fails_a_doubled_one(model_cache, tmp_path: Path) -> None:
    from loraship.check.verify import verify

    case = CASES[0]
    base = model_cache(case.config)
    adapter = _adapter(case, base, tmp_path / "adapter")
    merge(base, adapter, tmp_path / "merged", progress=False)
    report = verify(base, adapter, tmp_path / "merged", threshold_overrides={"generation_tokens": 4})
    assert report.passed, report.failed_checks
    assert report.weights.exact == report.weights.changed > 0
    merge(tmp_path / "merged", adapter, tmp_path / "twice", progress=False)
    twice = verify(base, adapter, tmp_path / "twice", threshold_overrides={"generation_tokens": 4})
    failed = {f"{c.level}: {c.name}" for c in twice.checks if c.passed is False}
    assert {"weights: changed tensors recomputed", "outputs: merge error / adapter effect"} <= failed


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
