"""``loraship merge`` against PEFT itself: every output tensor bit-identical to
``PeftModel.from_pretrained(base, adapter).merge_and_unload().save_pretrained()`` on CPU, for every
supported adapter kind, on fp32, bf16 and fp16 bases, on several architectures. Where PEFT's merge
is known to differ from base + adapter (tied embeddings), the merged model's outputs are checked
against PEFT's unmerged model instead, and the difference is asserted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import (
    BERT,
    GPT2,
    GPT2_WIDE,
    GPT_OSS,
    LLAMA,
    LLAMA_TIED,
    LLAMA_WIDE,
    QWEN2,
    RESNET,
    WAV2VEC2,
    assert_changes_as_planned,
    assert_same_tensors,
    load_tensors,
    peft_outputs,
    peft_reference,
    plain_outputs,
)

from loraship.engine.merge import merge
from loraship.tiny import build_adapter

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class Case:
    id: str
    config: dict[str, Any]
    lora: dict[str, Any]
    model_class: str = "AutoModelForCausalLM"
    resize: int | None = None
    save_kwargs: dict[str, Any] = field(default_factory=dict)
    adapter_dtype: str | None = None
    inputs: str = "tokens"


CASES = [
    Case("lora-linear-llama", LLAMA, {"target_modules": ALL_LINEAR}),
    Case("blocked-rows", LLAMA_WIDE, {"target_modules": ["gate_proj", "up_proj", "down_proj"], "r": 16}),
    Case("blocked-conv1d-columns", GPT2_WIDE, {"target_modules": ["c_attn", "c_fc"], "fan_in_fan_out": True}),
    Case("rslora", LLAMA, {"target_modules": ["q_proj", "v_proj"], "use_rslora": True, "r": 8, "lora_alpha": 16}),
    Case(
        "rank-alpha-pattern",
        LLAMA,
        {
            "target_modules": ["q_proj", "v_proj", "up_proj"],
            "r": 4,
            "lora_alpha": 8,
            "rank_pattern": {"q_proj": 2, "layers.1.mlp.up_proj": 6},
            "alpha_pattern": {"v_proj": 3, "up_proj": 5},
        },
    ),
    Case("adapter-saved-bf16", LLAMA, {"target_modules": ["q_proj", "o_proj"]}, adapter_dtype="bfloat16"),
    Case("conv1d-gpt2-fan-in-fan-out", GPT2, {"target_modules": ["c_attn", "c_proj", "c_fc"], "fan_in_fan_out": True}),
    Case("gpt2-config-says-no-fan-in-fan-out", GPT2, {"target_modules": ["c_attn", "c_proj"], "fan_in_fan_out": False}),
    Case("lora-embedding", LLAMA, {"target_modules": ["embed_tokens", "q_proj"]}),
    Case("lora-lm-head", LLAMA, {"target_modules": ["lm_head"]}),
    Case(
        "conv2d-resnet",
        RESNET,
        {"target_modules": ["convolution"]},
        model_class="AutoModelForImageClassification",
        inputs="pixels",
    ),
    Case(
        "conv1d-wav2vec2",
        WAV2VEC2,
        {"target_modules": r"feature_extractor\.conv_layers\.\d+\.conv"},
        model_class="AutoModel",
        inputs="audio",
    ),
    Case("dora-linear", LLAMA, {"target_modules": ["q_proj", "v_proj", "down_proj"], "use_dora": True}),
    Case("dora-embedding", LLAMA, {"target_modules": ["embed_tokens"], "use_dora": True}),
    Case(
        "dora-conv2d",
        RESNET,
        {"target_modules": ["convolution"], "use_dora": True},
        model_class="AutoModelForImageClassification",
        inputs="pixels",
    ),
    Case("dora-conv1d-gpt2", GPT2, {"target_modules": ["c_attn", "c_fc"], "use_dora": True, "fan_in_fan_out": True}),
    Case("lora-bias", QWEN2, {"target_modules": ["q_proj", "k_proj", "v_proj"], "lora_bias": True}),
    Case("bias-all", GPT2, {"target_modules": ["c_attn"], "bias": "all", "fan_in_fan_out": True}),
    Case("bias-lora-only", QWEN2, {"target_modules": ["q_proj", "v_proj"], "bias": "lora_only"}),
    Case("modules-to-save", LLAMA, {"target_modules": ["q_proj"], "modules_to_save": ["lm_head", "norm"]}),
    Case("trainable-tokens", LLAMA, {"target_modules": ["q_proj"], "trainable_token_indices": [1, 5, 7]}),
    Case("trainable-tokens-tied", LLAMA_TIED, {"target_modules": ["q_proj"], "trainable_token_indices": [2, 3]}),
    Case(
        "vocab-resize", LLAMA, {"target_modules": ["q_proj"], "modules_to_save": ["embed_tokens", "lm_head"]}, resize=70
    ),
    Case(
        "moe-target-parameters-gpt-oss",
        GPT_OSS,
        {
            "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
            "target_modules": ["q_proj"],
            "lora_dropout": 0.0,
        },
    ),
    Case(  # PEFT nests by the module's parameter order, whatever the order of the list
        "moe-target-parameters-gpt-oss-reversed",
        GPT_OSS,
        {"target_parameters": ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"], "lora_dropout": 0.0},
    ),
    Case(
        "bert-sequence-classification",
        BERT,
        {"target_modules": ["query", "value"], "task_type": "SEQ_CLS"},
        model_class="AutoModelForSequenceClassification",
    ),
]
DTYPES = ["float32", "bfloat16", "float16"]


def _inputs(kind: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    if kind == "pixels":
        return {"pixel_values": torch.randn(1, 3, 16, 16, generator=g)}
    if kind == "audio":
        return {"input_values": torch.randn(1, 64, generator=g)}
    return {"input_ids": torch.randint(0, 30, (1, 9), generator=g)}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bit_identical_to_peft(case: Case, dtype: str, model_cache, tmp_path: Path) -> None:
    base = model_cache(case.config, model_class=case.model_class, dtype=dtype)
    adapter = build_adapter(
        base, tmp_path / "adapter", model_class=case.model_class, resize_vocab=case.resize,
        save_kwargs=case.save_kwargs, adapter_dtype=case.adapter_dtype, **case.lora,
    )  # fmt: skip
    result = merge(base, adapter, tmp_path / "merged", progress=False)
    reference = peft_reference(
        base, adapter, tmp_path / "peft", model_class=case.model_class, dtype=getattr(torch, dtype),
        resize_vocab=case.resize,
    )  # fmt: skip
    ours = load_tensors(tmp_path / "merged")
    untouched = frozenset(t.name for t in result.prepared.plan.tensors if not t.changed)
    assert_same_tensors(ours, reference, upcast_ok=untouched)
    assert_changes_as_planned(result.prepared.plan, ours, base)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_merged_folder_behaves_like_base_plus_adapter(case: Case, model_cache, tmp_path: Path) -> None:
    """fp32 base: the merged folder, loaded with plain transformers, matches PEFT's unmerged model."""
    base = model_cache(case.config, model_class=case.model_class, dtype="float32")
    adapter = build_adapter(
        base, tmp_path / "adapter", model_class=case.model_class, resize_vocab=case.resize, **case.lora
    )
    merge(base, adapter, tmp_path / "merged", progress=False)
    inputs = _inputs(case.inputs)
    expected = peft_outputs(base, adapter, inputs, model_class=case.model_class, resize_vocab=case.resize)
    actual = plain_outputs(tmp_path / "merged", inputs, model_class=case.model_class)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- tied embeddings


@dataclass(frozen=True)
class TiedCase:
    id: str
    lora: dict[str, Any]
    untied: bool
    #: output tensor -> PEFT output tensor holding the same bits (PEFT merges into the shared weight)
    same_as_peft: dict[str, str]
    peft_merge_is_wrong: bool


TIED_CASES = [
    TiedCase("lora-embedding", {"target_modules": ["embed_tokens"]}, True,
             {"model.embed_tokens.weight": "model.embed_tokens.weight"}, True),
    TiedCase("lora-lm-head", {"target_modules": ["lm_head"]}, True,
             {"lm_head.weight": "model.embed_tokens.weight"}, True),
    TiedCase("lora-both", {"target_modules": ["embed_tokens", "lm_head"]}, True, {}, True),
    TiedCase("modules-to-save-lm-head", {"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]}, True,
             {"lm_head.weight": "lm_head.weight", "model.embed_tokens.weight": "model.embed_tokens.weight"}, False),
    TiedCase("modules-to-save-embedding", {"target_modules": ["q_proj"], "modules_to_save": ["embed_tokens"]}, True,
             {"lm_head.weight": "lm_head.weight", "model.embed_tokens.weight": "model.embed_tokens.weight"}, False),
    TiedCase("ensure-weight-tying", {"target_modules": ["embed_tokens"], "ensure_weight_tying": True}, False,
             {}, True),
]  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", TIED_CASES, ids=lambda c: c.id)
def test_tied_embeddings_follow_base_plus_adapter(case: TiedCase, dtype: str, model_cache, tmp_path: Path) -> None:
    """A tied base whose embeddings the adapter changes: the merged model behaves as base + adapter
    (PEFT, unmerged) does, untying the embeddings when the adapter changes one side only."""
    base = model_cache(LLAMA_TIED, dtype=dtype)
    adapter = build_adapter(base, tmp_path / "adapter", **case.lora)
    result = merge(base, adapter, tmp_path / "merged", progress=False)
    ours = load_tensors(tmp_path / "merged")
    reference = peft_reference(base, adapter, tmp_path / "peft", dtype=getattr(torch, dtype))
    config = result.prepared.plan.config_updates
    assert ("lm_head.weight" in ours) is case.untied
    assert config.get("tie_word_embeddings", True) is not case.untied
    assert any("Untied the embeddings" in n for n in result.prepared.plan.notes) is case.untied
    # Tensors away from the embeddings are bit-identical to PEFT's merge.
    rest = [n for n in reference if "embed_tokens" not in n and "lm_head" not in n]
    assert_same_tensors({n: ours[n] for n in rest}, {n: reference[n] for n in rest})
    for name, peft_name in case.same_as_peft.items():
        assert_same_tensors({name: ours[name]}, {name: reference[peft_name]})
    if dtype != "float32":
        return
    inputs = _inputs("tokens")
    expected = peft_outputs(base, adapter, inputs)
    torch.testing.assert_close(plain_outputs(tmp_path / "merged", inputs), expected, rtol=1e-4, atol=1e-4)
    peft_merged = plain_outputs(tmp_path / "peft", inputs)
    assert (not torch.allclose(peft_merged, expected, rtol=1e-3, atol=1e-3)) is case.peft_merge_is_wrong
