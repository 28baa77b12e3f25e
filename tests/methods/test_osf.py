"""OSF against PEFT: each output tensor bit-identical to ``merge_and_unload()`` on CPU, on fp32, bf16 and fp16
bases, with PEFT's SVD of the base weight recomputed as PEFT does at load (default, whole and fractional effective
ranks, rank_pattern, square and non-square weights, wider layers, a bf16 adapter); the merged folder loaded with plain
transformers behaves as PEFT's unmerged model; ``verify`` passes the merge and fails a doubled one; and what loraship
refuses.
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

ATTN_MLP = ["q_proj", "k_proj", "up_proj", "down_proj"]
#: Wider layers (256 x 96, 96 x 256): SVDs LAPACK computes in blocks.
LLAMA_96 = {**LLAMA, "hidden_size": 96, "intermediate_size": 256, "num_hidden_layers": 1, "num_attention_heads": 4,
            "num_key_value_heads": 2}  # fmt: skip


@dataclass(frozen=True)
class Case:
    id: str
    settings: dict[str, Any]
    config: dict[str, Any]
    model_class: str = "AutoModelForCausalLM"
    adapter_dtype: str | None = None
    inputs: str = "tokens"


CASES = [
    Case("osf", {"target_modules": ATTN_MLP}, LLAMA),
    Case("osf-random-init", {"target_modules": ATTN_MLP, "init_weights": False}, LLAMA),
    Case("osf-effective-rank", {"target_modules": ATTN_MLP, "effective_rank": 3}, LLAMA),
    Case("osf-fraction", {"target_modules": ATTN_MLP, "effective_rank": 0.25, "rank_pattern": {"up_proj": 12}}, LLAMA),
    Case("osf-adapter-bf16", {"target_modules": ["q_proj", "o_proj"]}, LLAMA, adapter_dtype="bfloat16"),
    Case("osf-bias", {"target_modules": ["q_proj", "v_proj", "o_proj"], "effective_rank": 2}, QWEN2),
    Case("osf-wide", {"target_modules": ["q_proj", "up_proj", "down_proj"], "effective_rank": 40}, LLAMA_96),
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
        base, folder, "OSF", model_class=case.model_class, adapter_dtype=case.adapter_dtype, **case.settings
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
    adapter = build_method_adapter(base, tmp_path / "adapter", "OSF", target_modules=["q_proj", "k_proj"],
                                   effective_rank=5)  # fmt: skip
    result = merge(base, adapter, tmp_path / "merged", progress=False)
    modules = result.prepared.adapter.method_modules
    method = method_of("OSF")
    assert method is not None and method.kind == "multiplicative"
    assert {method.describe(m) for m in modules} == {
        "OSF 11 trainable singular directions (SVD of W recomputed)",
        "OSF 3 trainable singular directions (SVD of W recomputed)",
    }
    assert method.summary(modules) == (
        "trainable rank = 3–11 (the frozen part recomputed from each base weight's SVD, as PEFT does at load)"
    )


def test_refuses_a_base_of_other_width(model_cache, tmp_path: Path) -> None:
    base = model_cache(LLAMA)
    adapter = build_method_adapter(base, tmp_path / "adapter", "OSF", target_modules=["q_proj"])
    wider = model_cache({**LLAMA, "hidden_size": 32})
    with pytest.raises(
        IncompatibleError,
        match=r"the adapter's U_low \[16, 8\] and V_low \[8, 16\] need a \[16, 16\] weight with more than 8 "
        r"singular directions\.",
    ):
        merge(wider, adapter, tmp_path / "merged", progress=False)
