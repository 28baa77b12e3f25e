"""BEFT against PEFT: each output tensor bit-identical to ``merge_and_unload()`` on CPU, on fp32, bf16 and fp16
bases (Qwen2's attention biases, a bf16 adapter); the merged folder loaded with plain transformers behaves as
PEFT's unmerged model; ``verify``; and the refusal of a layer without a bias, which PEFT refuses to merge too.

Every merge is checked against PEFT's own layers, which asks BEFT which parameter its tensors change (the bias).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import (
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
from loraship.errors import IncompatibleError
from loraship.methods.base import method_of
from loraship.tiny import build_method_adapter


def test_plan_check_places_beft_in_the_bias(model_cache, tmp_path: Path) -> None:
    """The check against PEFT's layers asks the method which parameter its tensors change: BEFT's, the bias."""
    base = model_cache(QWEN2)
    adapter = build_method_adapter(base, tmp_path / "adapter", "BEFT", target_modules=["q_proj", "v_proj"])
    result = merge(base, adapter, tmp_path / "merged", progress=False)
    names = result.prepared.names
    assert names is not None and names.skipped is None and names.agrees
    assert names.checked == len(result.prepared.adapter.tensors) == 4
    assert {result.prepared.plan.accounting[k] for k in result.prepared.adapter.tensors} == {
        f"model.layers.{i}.self_attn.{p}.bias" for i in (0, 1) for p in ("q_proj", "v_proj")
    }


@dataclass(frozen=True)
class Case:
    id: str
    settings: dict[str, Any]
    adapter_dtype: str | None = None


CASES = [
    Case("beft", {"target_modules": ["q_proj", "k_proj", "v_proj"]}),
    Case("beft-random-init", {"target_modules": ["q_proj", "v_proj"], "init_weights": False}),
    Case("beft-adapter-bf16", {"target_modules": ["k_proj"]}, adapter_dtype="bfloat16"),
]
DTYPES = ["float32", "bfloat16", "float16"]


def _inputs() -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(0, 30, (1, 9), generator=torch.Generator().manual_seed(0))}


def _adapter(case: Case, base: Path, folder: Path) -> Path:
    return build_method_adapter(base, folder, "BEFT", adapter_dtype=case.adapter_dtype, **case.settings)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bit_identical_to_peft(case: Case, dtype: str, model_cache, tmp_path: Path) -> None:
    base = model_cache(QWEN2, dtype=dtype)
    adapter = _adapter(case, base, tmp_path / "adapter")
    result = merge(base, adapter, tmp_path / "merged", progress=False)
    reference = peft_reference(base, adapter, tmp_path / "peft", dtype=getattr(torch, dtype))
    ours = load_tensors(tmp_path / "merged")
    untouched = frozenset(t.name for t in result.prepared.plan.tensors if not t.changed)
    assert_same_tensors(ours, reference, upcast_ok=untouched)
    assert_changes_as_planned(result.prepared.plan, ours, base)
    assert all(t.name.endswith(".bias") for t in result.prepared.plan.changed)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_merged_folder_behaves_like_base_plus_adapter(case: Case, model_cache, tmp_path: Path) -> None:
    base = model_cache(QWEN2, dtype="float32")
    adapter = _adapter(case, base, tmp_path / "adapter")
    merge(base, adapter, tmp_path / "merged", progress=False)
    expected = peft_outputs(base, adapter, _inputs())
    torch.testing.assert_close(plain_outputs(tmp_path / "merged", _inputs()), expected, rtol=1e-4, atol=1e-4)


def test_verify_passes_a_correct_merge_and_fails_a_doubled_one(model_cache, tmp_path: Path) -> None:
    from loraship.check.verify import verify

    base = model_cache(QWEN2)
    adapter = _adapter(CASES[0], base, tmp_path / "adapter")
    merge(base, adapter, tmp_path / "merged", progress=False)
    report = verify(base, adapter, tmp_path / "merged", threshold_overrides={"generation_tokens": 4})
    assert report.passed, report.failed_checks
    assert report.weights.exact == report.weights.changed > 0
    merge(tmp_path / "merged", adapter, tmp_path / "twice", progress=False)
    twice = verify(base, adapter, tmp_path / "twice", threshold_overrides={"generation_tokens": 4})
    failed = {f"{c.level}: {c.name}" for c in twice.checks if c.passed is False}
    assert {"weights: changed tensors recomputed", "outputs: merge error / adapter effect"} <= failed


def test_plan_and_card_words(model_cache, tmp_path: Path) -> None:
    base = model_cache(QWEN2)
    adapter = build_method_adapter(base, tmp_path / "adapter", "BEFT", target_modules=["q_proj", "v_proj"])
    result = merge(base, adapter, tmp_path / "merged", progress=False)
    modules = result.prepared.adapter.method_modules
    method = method_of("BEFT")
    assert method is not None and method.kind == "additive"
    assert {method.describe(m) for m in modules} == {"BEFT bias"}
    assert method.summary(modules) == "4 bias(es) tuned"


def test_layer_without_bias_refused_as_peft_refuses_it(model_cache, tmp_path: Path) -> None:
    """PEFT adapts o_proj (no bias) but its merge raises "Base layer has no bias"; loraship refuses to plan it."""
    base = model_cache(QWEN2)
    adapter = build_method_adapter(base, tmp_path / "adapter", "BEFT", target_modules=["q_proj", "o_proj"])
    with pytest.raises(IncompatibleError) as e:
        merge(base, adapter, tmp_path / "merged", progress=False)
    assert e.value.message == (
        "The BEFT adapter changes the bias of `model.layers.0.self_attn.o_proj` (and of 1 more layer(s)), but that "
        f"layer has no bias in the base model `{base}` (only `model.layers.0.self_attn.o_proj.weight`): there is "
        "nothing to merge the change into, and PEFT cannot merge it either."
    )
    assert e.value.fix.startswith("If this is not the base the adapter was trained on")
    assert e.value.fix.endswith(
        ", use that one; otherwise ship the adapter unmerged (PEFT runs it so), or train it again without targeting "
        "layers that have no bias."
    )
    assert not (tmp_path / "merged").exists()


def test_model_without_biases_refused(model_cache, tmp_path: Path) -> None:
    base = model_cache(LLAMA)
    adapter = build_method_adapter(base, tmp_path / "adapter", "BEFT", target_modules=["q_proj"])
    with pytest.raises(IncompatibleError):
        merge(base, adapter, tmp_path / "merged", progress=False)
    assert not (tmp_path / "merged").exists()


def test_refuses_a_base_of_other_width(model_cache, tmp_path: Path) -> None:
    base = model_cache(QWEN2)
    adapter = build_method_adapter(base, tmp_path / "adapter", "BEFT", target_modules=["q_proj"])
    wider = model_cache({**QWEN2, "hidden_size": 32})
    with pytest.raises(IncompatibleError) as e:
        merge(wider, adapter, tmp_path / "merged", progress=False)
    assert e.value.message == (
        "Shape mismatch for `model.layers.0.self_attn.q_proj.bias`: the base tensor is [32], but the adapter's "
        "beft_bias [1, 16] needs a bias of 16 output features."
    )
