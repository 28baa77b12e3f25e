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
from conftest import GPT2, LLAMA, LLAMA_TIED, QWEN2, RESNET
from methods.harness import (
    DOUBLED,
    DTYPES,
    check_behaves_like_peft,
    check_bit_identical,
    failed_checks,
    untouched,
    verify_merged_and_doubled,
)
from methods.harness import Case as MethodCase

ATTN_MLP = ["q_proj", "v_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class Case(MethodCase):
    method: str = ""  # the PEFT type, one per case: this file covers several methods

    @property
    def peft_type(self) -> str:  # type: ignore[override]
        return self.method


def _case(id: str, peft_type: str, settings: dict[str, Any], config: dict[str, Any], **more: Any) -> Case:
    return Case(id, settings, config, method=peft_type, **more)


def _conv(id: str, peft_type: str, settings: dict[str, Any]) -> Case:
    """A case on a ResNet's 1x1 and 3x3 convolutions."""
    return _case(id, peft_type, settings, RESNET, model_class="AutoModelForImageClassification", inputs="pixels")


CASES = [
    _case("loha", "LOHA", {"target_modules": ATTN_MLP, "r": 4, "alpha": 8, "init_weights": False}, LLAMA),
    _case(
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
    _case(
        "loha-adapter-bf16", "LOHA", {"target_modules": ["q_proj", "o_proj"], "r": 2}, LLAMA, adapter_dtype="bfloat16"
    ),
    _conv("loha-conv2d", "LOHA", {"target_modules": ["convolution"], "r": 2}),
    _conv("loha-effective-conv2d", "LOHA", {"target_modules": ["convolution"], "r": 2, "use_effective_conv2d": True}),
    _case("lokr", "LOKR", {"target_modules": ATTN_MLP, "r": 2, "alpha": 8}, LLAMA),
    _case("lokr-full-factors", "LOKR", {"target_modules": ATTN_MLP, "r": 16, "alpha": 8}, LLAMA),
    _case("lokr-decompose-both", "LOKR", {"target_modules": ATTN_MLP, "r": 1, "decompose_both": True}, LLAMA),
    _case("lokr-decompose-factor", "LOKR", {"target_modules": ATTN_MLP, "r": 2, "decompose_factor": 2}, LLAMA),
    _case("lokr-rank-dropout", "LOKR", {"target_modules": ["q_proj"], "r": 2, "rank_dropout": 0.5}, LLAMA),
    _conv("lokr-effective-conv2d", "LOKR", {"target_modules": ["convolution"], "r": 2, "use_effective_conv2d": True}),
    _case(
        "ia3",
        "IA3",
        {"target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]},
        LLAMA,
    ),
    _case(  # attention projections with biases: the non-feed-forward ones scale their bias too
        "ia3-bias",
        "IA3",
        {"target_modules": ["q_proj", "v_proj", "up_proj"], "feedforward_modules": ["up_proj"]},
        QWEN2,
    ),
    _case(
        "ia3-feedforward-regex",
        "IA3",
        {"target_modules": r".*\.(k_proj|down_proj)", "feedforward_modules": r".*\.down_proj"},
        LLAMA,
    ),
    _case(  # GPT-2's Conv1D stores weights (in, out): PEFT transposes the vector
        "ia3-conv1d-gpt2",
        "IA3",
        {"target_modules": ["c_attn", "c_fc"], "feedforward_modules": ["c_fc"], "fan_in_fan_out": True},
        GPT2,
    ),
    _case(  # the trained biases of the adapted layers ride along as trained copies
        "hra-bias-hra-only", "HRA", {"target_modules": ["q_proj", "v_proj"], "r": 2, "bias": "hra_only"}, QWEN2
    ),
    _case("ln-tuning", "LN_TUNING", {"target_modules": ["input_layernorm", "norm"]}, LLAMA),
    _case(
        "trainable-tokens", "TRAINABLE_TOKENS", {"target_modules": ["embed_tokens"], "token_indices": [1, 5, 7]}, LLAMA
    ),
    _case(
        "trainable-tokens-tied",
        "TRAINABLE_TOKENS",
        {"target_modules": ["embed_tokens"], "token_indices": [2, 3]},
        LLAMA_TIED,
    ),
]


def _untouched_or_replaced(plan: Any) -> frozenset[str]:
    """The tensors transformers may upcast on load: those left as they are, and those LN tuning replaces."""
    replaced = frozenset(
        t.name for t in plan.tensors if any(getattr(s, "origin", None) == "ln_tuning" for s in t.steps)
    )
    return untouched(plan) | replaced


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bit_identical_to_peft(case: Case, dtype: str, model_cache, tmp_path: Path) -> None:
    check_bit_identical(case, dtype, model_cache, tmp_path, upcast_ok=_untouched_or_replaced)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_merged_folder_behaves_like_base_plus_adapter(case: Case, model_cache, tmp_path: Path) -> None:
    check_behaves_like_peft(case, model_cache, tmp_path)


VERIFIED = [c for c in CASES if c.id in ("loha", "lokr-decompose-both", "ia3-bias", "ln-tuning", "trainable-tokens")]


@pytest.mark.parametrize("case", VERIFIED, ids=lambda c: c.id)
def test_verify_passes_a_correct_merge_and_fails_a_doubled_one(case: Case, model_cache, tmp_path: Path) -> None:
    """``verify`` recomputes the method's change and runs PEFT's unmerged model: a merge applied twice
    (merged into the merged model) fails both the weights and, where it changes outputs, the outputs."""
    report, twice = verify_merged_and_doubled(case, model_cache, tmp_path)
    assert next(c for c in report.checks if c.name.startswith("names and tying")).passed is True
    if case.peft_type in ("LN_TUNING", "TRAINABLE_TOKENS"):  # replacing twice is replacing once
        assert twice.passed, twice.failed_checks
    else:
        assert failed_checks(twice) >= DOUBLED
