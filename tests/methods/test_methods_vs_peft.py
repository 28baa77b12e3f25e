"""Every PEFT method loraship merges besides LoRA, against PEFT itself: each output tensor
bit-identical to ``PeftModel.from_pretrained(base, adapter).merge_and_unload().save_pretrained()`` on
CPU, on fp32, bf16 and fp16 bases; the merged folder loaded with plain transformers behaves as PEFT's
unmerged model; and the merge changes exactly the tensors the adapter changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import (
    GPT2,
    LLAMA,
    LLAMA_TIED,
    QWEN2,
    RESNET,
    assert_changes_as_planned,
    assert_same_tensors,
    load_tensors,
    peft_outputs,
    peft_reference,
    plain_outputs,
)

from loraship.engine.merge import merge
from loraship.tiny import build_method_adapter

ATTN_MLP = ["q_proj", "v_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class Case:
    id: str
    peft_type: str
    settings: dict[str, Any]
    config: dict[str, Any]
    model_class: str = "AutoModelForCausalLM"
    adapter_dtype: str | None = None
    inputs: str = "tokens"


def _conv(id: str, peft_type: str, settings: dict[str, Any]) -> Case:
    """A case on a ResNet's 1x1 and 3x3 convolutions."""
    return Case(id, peft_type, settings, RESNET, model_class="AutoModelForImageClassification", inputs="pixels")


CASES = [
    Case("loha", "LOHA", {"target_modules": ATTN_MLP, "r": 4, "alpha": 8, "init_weights": False}, LLAMA),
    Case(
        "loha-rank-alpha-pattern",
        "LOHA",
        {
            "target_modules": ATTN_MLP,
            "r": 4,
            "alpha": 8,
            "rank_pattern": {"q_proj": 2},
            "alpha_pattern": {"down_proj": 3},
        },
        LLAMA,
    ),
    Case(
        "loha-adapter-bf16", "LOHA", {"target_modules": ["q_proj", "o_proj"], "r": 2}, LLAMA, adapter_dtype="bfloat16"
    ),
    _conv("loha-conv2d", "LOHA", {"target_modules": ["convolution"], "r": 2}),
    _conv("loha-effective-conv2d", "LOHA", {"target_modules": ["convolution"], "r": 2, "use_effective_conv2d": True}),
    Case("lokr", "LOKR", {"target_modules": ATTN_MLP, "r": 2, "alpha": 8}, LLAMA),
    Case("lokr-full-factors", "LOKR", {"target_modules": ATTN_MLP, "r": 16, "alpha": 8}, LLAMA),
    Case("lokr-decompose-both", "LOKR", {"target_modules": ATTN_MLP, "r": 1, "decompose_both": True}, LLAMA),
    Case("lokr-decompose-factor", "LOKR", {"target_modules": ATTN_MLP, "r": 2, "decompose_factor": 2}, LLAMA),
    Case("lokr-rank-dropout", "LOKR", {"target_modules": ["q_proj"], "r": 2, "rank_dropout": 0.5}, LLAMA),
    _conv("lokr-effective-conv2d", "LOKR", {"target_modules": ["convolution"], "r": 2, "use_effective_conv2d": True}),
    Case(
        "ia3",
        "IA3",
        {"target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]},
        LLAMA,
    ),
    Case(  # attention projections with biases: the non-feed-forward ones scale their bias too
        "ia3-bias",
        "IA3",
        {"target_modules": ["q_proj", "v_proj", "up_proj"], "feedforward_modules": ["up_proj"]},
        QWEN2,
    ),
    Case(
        "ia3-feedforward-regex",
        "IA3",
        {"target_modules": r".*\.(k_proj|down_proj)", "feedforward_modules": r".*\.down_proj"},
        LLAMA,
    ),
    Case(  # GPT-2's Conv1D stores weights (in, out): PEFT transposes the vector
        "ia3-conv1d-gpt2",
        "IA3",
        {"target_modules": ["c_attn", "c_fc"], "feedforward_modules": ["c_fc"], "fan_in_fan_out": True},
        GPT2,
    ),
    Case(  # the trained biases of the adapted layers ride along as trained copies
        "hra-bias-hra-only", "HRA", {"target_modules": ["q_proj", "v_proj"], "r": 2, "bias": "hra_only"}, QWEN2
    ),
    Case("ln-tuning", "LN_TUNING", {"target_modules": ["input_layernorm", "norm"]}, LLAMA),
    Case(
        "trainable-tokens", "TRAINABLE_TOKENS", {"target_modules": ["embed_tokens"], "token_indices": [1, 5, 7]}, LLAMA
    ),
    Case(
        "trainable-tokens-tied",
        "TRAINABLE_TOKENS",
        {"target_modules": ["embed_tokens"], "token_indices": [2, 3]},
        LLAMA_TIED,
    ),
]
DTYPES = ["float32", "bfloat16", "float16"]


def _inputs(kind: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    if kind == "pixels":
        return {"pixel_values": torch.randn(1, 3, 16, 16, generator=g)}
    return {"input_ids": torch.randint(0, 30, (1, 9), generator=g)}


def _adapter(case: Case, base: Path, folder: Path) -> Path:
    return build_method_adapter(
        base, folder, case.peft_type, model_class=case.model_class, adapter_dtype=case.adapter_dtype, **case.settings
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
    replaced = frozenset(
        t.name for t in result.prepared.plan.tensors if any(getattr(s, "origin", None) == "ln_tuning" for s in t.steps)
    )
    assert_same_tensors(ours, reference, upcast_ok=untouched | replaced)
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


VERIFIED = [c for c in CASES if c.id in ("loha", "lokr-decompose-both", "ia3-bias", "ln-tuning", "trainable-tokens")]


@pytest.mark.parametrize("case", VERIFIED, ids=lambda c: c.id)
def test_verify_passes_a_correct_merge_and_fails_a_doubled_one(case: Case, model_cache, tmp_path: Path) -> None:
    """``verify`` recomputes the method's change and runs PEFT's unmerged model: a merge applied twice
    (merged into the merged model) fails both the weights and, where it changes outputs, the outputs."""
    from loraship.check.verify import verify

    base = model_cache(case.config, model_class=case.model_class)
    adapter = _adapter(case, base, tmp_path / "adapter")
    merge(base, adapter, tmp_path / "merged", progress=False)
    report = verify(base, adapter, tmp_path / "merged", threshold_overrides={"generation_tokens": 4})
    assert report.passed, report.failed_checks
    assert report.weights.exact == report.weights.changed > 0
    assert next(c for c in report.checks if c.name.startswith("names and tying")).passed is True
    merge(tmp_path / "merged", adapter, tmp_path / "twice", progress=False)
    twice = verify(base, adapter, tmp_path / "twice", threshold_overrides={"generation_tokens": 4})
    failed = {f"{c.level}: {c.name}" for c in twice.checks if c.passed is False}
    if case.peft_type in ("LN_TUNING", "TRAINABLE_TOKENS"):  # replacing twice is replacing once
        assert twice.passed, twice.failed_checks
    else:
        assert {"weights: changed tensors recomputed", "outputs: merge error / adapter effect"} <= failed
