"""HiRA against PEFT: each output tensor bit-identical to ``merge_and_unload()`` on CPU, on fp32, bf16 and fp16
bases (Linear, Conv1D, Embedding and Conv2d layers, rank_pattern, a bf16 adapter); the merged folder loaded with
plain transformers behaves as PEFT's unmerged model; ``verify`` passes the merge and fails a doubled one; and what
loraship refuses.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import (
    GPT2,
    LLAMA,
    LLAMA_TIED,
    RESNET,
    WAV2VEC2,
    assert_same_tensors,
    load_tensors,
    peft_outputs,
    peft_reference,
    plain_outputs,
)
from methods.harness import DTYPES, check_behaves_like_peft, check_bit_identical, check_verify_catches_double_merge
from methods.harness import Case as MethodCase
from methods.harness import inputs as harness_inputs

from loraship.engine.merge import merge
from loraship.errors import IncompatibleError
from loraship.methods.base import method_of
from loraship.tiny import build_method_adapter

ATTN_MLP = ["q_proj", "v_proj", "up_proj", "down_proj"]


class Case(MethodCase):
    peft_type = "HIRA"


CASES = [
    Case("hira", {"target_modules": ATTN_MLP, "r": 4}, LLAMA),
    Case("hira-rank-pattern", {"target_modules": ATTN_MLP, "r": 4, "rank_pattern": {"up_proj": 2}}, LLAMA),
    Case("hira-adapter-bf16", {"target_modules": ["q_proj", "o_proj"], "r": 2}, LLAMA, adapter_dtype="bfloat16"),
    Case("hira-embedding", {"target_modules": ["embed_tokens", "k_proj"], "r": 3}, LLAMA),
    Case("hira-conv1d-gpt2", {"target_modules": ["c_attn", "c_fc"], "r": 2, "fan_in_fan_out": True}, GPT2),
    Case(  # the 7x7 stem, 1x1 and 3x3 convolutions
        "hira-conv2d",
        {"target_modules": ["convolution"], "r": 2},
        RESNET,
        model_class="AutoModelForImageClassification",
        inputs="pixels",
    ),
    Case(  # Conv1d (3-D weights): PEFT's conv1d of the factors
        "hira-conv1d-wav2vec2",
        {"target_modules": r"feature_extractor\.conv_layers\.\d+\.conv", "r": 2},
        WAV2VEC2,
        model_class="AutoModel",
        inputs="audio",
    ),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bit_identical_to_peft(case: Case, dtype: str, model_cache, tmp_path: Path) -> None:
    check_bit_identical(case, dtype, model_cache, tmp_path)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_merged_folder_behaves_like_base_plus_adapter(case: Case, model_cache, tmp_path: Path) -> None:
    check_behaves_like_peft(case, model_cache, tmp_path)


@pytest.mark.parametrize("dtype", DTYPES)
def test_tied_embedding_is_changed_on_its_own(dtype: str, model_cache, tmp_path: Path) -> None:
    """HiRA on a tied input embedding: PEFT's unmerged model changes only the lookups, so the merged model stores the
    changed embedding (PEFT's merged bits) apart from the output embedding (the base's), as base + adapter behaves."""
    base = model_cache(LLAMA_TIED, dtype=dtype)
    adapter = build_method_adapter(base, tmp_path / "adapter", "HIRA", target_modules=["embed_tokens"], r=2)
    merge(base, adapter, tmp_path / "merged", progress=False)
    reference = peft_reference(base, adapter, tmp_path / "peft", dtype=getattr(torch, dtype))
    ours, before = load_tensors(tmp_path / "merged"), load_tensors(base)
    assert_same_tensors({"e": ours["model.embed_tokens.weight"]}, {"e": reference["model.embed_tokens.weight"]})
    assert_same_tensors({"e": ours["lm_head.weight"]}, {"e": before["model.embed_tokens.weight"]})
    if dtype == "float32":
        inputs = harness_inputs("tokens")
        expected = peft_outputs(base, adapter, inputs)
        torch.testing.assert_close(plain_outputs(tmp_path / "merged", inputs), expected, rtol=1e-4, atol=1e-4)


def test_verify_passes_a_correct_merge_and_fails_a_doubled_one(model_cache, tmp_path: Path) -> None:
    check_verify_catches_double_merge(CASES[0], model_cache, tmp_path)


def test_plan_and_card_words(model_cache, tmp_path: Path) -> None:
    base = model_cache(LLAMA)
    adapter = build_method_adapter(base, tmp_path / "adapter", "HIRA", target_modules=["q_proj", "embed_tokens"], r=4)
    result = merge(base, adapter, tmp_path / "merged", progress=False)
    modules = result.prepared.adapter.method_modules
    method = method_of("HIRA")
    assert method is not None and method.kind == "multiplicative"
    assert {method.describe(m) for m in modules} == {"HiRA r=4", "HiRA (embedding) r=4"}
    assert method.summary(modules) == "r = 4, W ⊙ (B @ A) added"


def test_refuses_a_base_of_other_width(model_cache, tmp_path: Path) -> None:
    base = model_cache(LLAMA)
    adapter = build_method_adapter(base, tmp_path / "adapter", "HIRA", target_modules=["q_proj"], r=2)
    wider = model_cache({**LLAMA, "hidden_size": 32})
    with pytest.raises(
        IncompatibleError,
        match=r"the adapter's hira_A \[2, 16\] and hira_B \[16, 2\] need a \[16, 16\] weight",
    ):
        merge(wider, adapter, tmp_path / "merged", progress=False)


def test_shape_problems_in_words() -> None:
    """What loraship does not merge (Conv3d: 5-D weights) and bases that do not fit, in words."""
    method = method_of("HIRA")
    assert method is not None

    @dataclass(frozen=True)
    class Info:
        name: str
        shape: tuple[int, ...]

    conv3d = method.module("c", {"hira_A": Info("a", (2, 4, 1, 1, 3)), "hira_B": Info("b", (8, 2, 1, 1, 1))}, {},
                           Path("a"))  # fmt: skip
    assert method.shape_problem(conv3d, "weight", (8, 4, 1, 1, 3), False) == (
        "HiRA on a 5-D weight is not merged by loraship (it merges HiRA on Linear, Conv1D, Embedding, Conv1d and "
        "Conv2d layers)"
    )
    conv = method.module("c", {"hira_A": Info("a", (2, 4, 3, 3)), "hira_B": Info("b", (8, 2, 1, 1))}, {}, Path("a"))
    assert method.shape_problem(conv, "weight", (8, 4, 3, 3), False) is None
    assert method.shape_problem(conv, "weight", (8, 2, 3, 3), False) == (
        "the adapter's hira_A [2, 4, 3, 3] and hira_B [8, 2, 1, 1] need a [8, 4, 3, 3] weight (HiRA does not support "
        "grouped convolutions)"
    )
    assert method.shape_problem(conv, "weight", (8, 4), False) == (
        "the adapter's hira_A [2, 4, 3, 3] is a 2-D convolution's, not a 2-D weight's"
    )
    linear = method.module("q", {"hira_A": Info("a", (2, 16)), "hira_B": Info("b", (24, 2))}, {}, Path("a"))
    assert method.shape_problem(linear, "weight", (24, 16), False) is None
    assert method.shape_problem(linear, "weight", (16, 24), True) is None
