"""Architecture families beyond the dense decoders: encoder-decoders, tied decoders stored either
way, vision-language models (legacy and v5 checkpoint names), heads trained on pretraining
checkpoints, tying recipes. Each merge is checked three ways:

- the merged model (plain transformers) behaves as base + adapter through PEFT, unmerged;
- every tensor PEFT's own ``merge_and_unload`` + ``save_pretrained`` also writes is bit-identical,
  except where PEFT's merge is known to be wrong (tied tensors changed on one side: the case says);
- ``loraship verify --weights-only`` passes, its names-and-tying check included.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import bits, load_tensors, peft_outputs, peft_reference, plain_outputs

from loraship.check.verify import verify
from loraship.engine.merge import merge
from loraship.tiny import build_adapter, build_model

BART = {
    "model_type": "bart", "vocab_size": 50, "d_model": 16, "encoder_layers": 1, "decoder_layers": 1,
    "encoder_attention_heads": 2, "decoder_attention_heads": 2, "encoder_ffn_dim": 8, "decoder_ffn_dim": 8,
    "max_position_embeddings": 32,
}  # fmt: skip
T5 = {"model_type": "t5", "vocab_size": 50, "d_model": 16, "d_ff": 8, "num_layers": 1, "num_heads": 2, "d_kv": 8}
WHISPER = {
    "model_type": "whisper", "vocab_size": 60, "d_model": 16, "encoder_layers": 1, "decoder_layers": 1,
    "encoder_attention_heads": 2, "decoder_attention_heads": 2, "encoder_ffn_dim": 8, "decoder_ffn_dim": 8,
    "num_mel_bins": 8, "max_source_positions": 16, "max_target_positions": 16, "pad_token_id": 1,
    "bos_token_id": 0, "eos_token_id": 2, "decoder_start_token_id": 0,
}  # fmt: skip
QWEN2_TIED = {
    "model_type": "qwen2", "vocab_size": 64, "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 1,
    "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 64, "tie_word_embeddings": True,
}  # fmt: skip
GEMMA2 = {
    "model_type": "gemma2", "vocab_size": 64, "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 1,
    "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8,
}  # fmt: skip
ROBERTA = {
    "model_type": "roberta", "vocab_size": 60, "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
    "intermediate_size": 24, "max_position_embeddings": 40, "num_labels": 3,
}  # fmt: skip
TEXT = {"vocab_size": 64, "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 1}  # fmt: skip
VISION = {"hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 1, "num_attention_heads": 2,
          "image_size": 28, "patch_size": 14}  # fmt: skip
GEMMA3 = {
    "model_type": "gemma3",
    "text_config": {**TEXT, "head_dim": 8},
    "vision_config": VISION,
    "mm_tokens_per_image": 4,
}
LLAVA = {
    "model_type": "llava", "text_config": {"model_type": "llama", **TEXT},
    "vision_config": {"model_type": "clip_vision_model", **VISION, "projection_dim": 16},
}  # fmt: skip
MISTRAL3 = {
    "model_type": "mistral3", "text_config": {"model_type": "mistral", **TEXT, "head_dim": 8},
    "vision_config": {"model_type": "pixtral", "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 1,
                      "num_attention_heads": 2, "image_size": 28, "patch_size": 14, "head_dim": 8},
    "spatial_merge_size": 1,
}  # fmt: skip
IDEFICS3 = {
    "model_type": "idefics3", "text_config": {"model_type": "llama", **TEXT},
    "vision_config": {**VISION, "image_size": 28}, "scale_factor": 1,
}  # fmt: skip
QWEN2_VL = {
    "model_type": "qwen2_vl", "text_config": {**TEXT, "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]}},
    "vision_config": {"depth": 1, "embed_dim": 16, "hidden_size": 16, "num_heads": 2, "patch_size": 14,
                      "spatial_merge_size": 1, "temporal_patch_size": 1},
}  # fmt: skip

TOWERS = r".*(language_model|vision|visual|text_model).*\.(q_proj|v_proj|qkv|fc1|linear_1)"


def _stored_under_lm_head(base: Path) -> None:
    """Store a tied decoder's shared tensor under the output head's name only."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(base / "model.safetensors"))
    tensors["lm_head.weight"] = tensors.pop("model.embed_tokens.weight")
    save_file(tensors, str(base / "model.safetensors"), metadata={"format": "pt"})


def _legacy_llava_names(base: Path) -> None:
    """Rename a LLaVA checkpoint to the names most Hub checkpoints still use (transformers v4)."""
    from safetensors.torch import load_file, save_file

    renamed = {}
    for key, value in load_file(str(base / "model.safetensors")).items():
        key = "language_model." + key if key == "lm_head.weight" else key
        renamed[key.replace("model.language_model.", "language_model.model.").replace("model.", "", 1)
                if key.startswith(("model.vision_tower.", "model.multi_modal_projector.")) else
                key.replace("model.language_model.", "language_model.model.")] = value  # fmt: skip
    save_file(renamed, str(base / "model.safetensors"), metadata={"format": "pt"})


def _original_t5_config(base: Path) -> None:
    """The config.json of the original T5 checkpoints on the Hub: no tie_word_embeddings key."""
    config = json.loads((base / "config.json").read_text())
    for key in ("tie_word_embeddings", "scale_decoder_outputs"):
        config.pop(key, None)
    (base / "config.json").write_text(json.dumps(config))


@dataclass(frozen=True)
class Family:
    id: str
    config: dict[str, Any]
    model_class: str
    lora: dict[str, Any]
    base_class: str | None = None  # the class the base checkpoint was saved from, when it differs
    tweak: Callable[[Path], None] | None = None
    inputs: str = "tokens"
    #: Why PEFT's merge_and_unload differs from base + adapter here (None: it must be bit-identical).
    peft_merge_wrong: str | None = None
    dtypes: tuple[str, ...] = ("float32", "bfloat16")
    untied: tuple[str, ...] = field(default_factory=tuple)
    #: How many stored expert tensors (names containing `experts.`) the merge must change (-1: some, as PEFT's).
    experts_changed: int = 0


ONE_SIDED_TIE = "PEFT merges a one-sided change of a tied weight into the shared tensor, changing the others too"
SWITCH = {  # an MoE whose experts are one Linear pair each (a ModuleDict), with a router
    "model_type": "switch_transformers", "vocab_size": 50, "d_model": 16, "d_ff": 8, "d_kv": 8, "num_layers": 2,
    "num_decoder_layers": 2, "num_heads": 2, "num_experts": 4, "expert_capacity": 64, "encoder_sparse_step": 1,
    "decoder_sparse_step": 1, "router_jitter_noise": 0.0,
}  # fmt: skip
MOE_TEXT = {"vocab_size": 64, "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
            "num_key_value_heads": 1, "head_dim": 8, "num_experts_per_tok": 2}  # fmt: skip
QWEN3_MOE = {"model_type": "qwen3_moe", **MOE_TEXT, "intermediate_size": 24, "moe_intermediate_size": 12,
             "num_experts": 4}  # fmt: skip
QWEN2_MOE = {"model_type": "qwen2_moe", **MOE_TEXT, "intermediate_size": 24, "moe_intermediate_size": 12,
             "shared_expert_intermediate_size": 20, "num_experts": 4}  # fmt: skip
MIXTRAL = {"model_type": "mixtral", **MOE_TEXT, "intermediate_size": 12, "num_local_experts": 4}
PHIMOE = {"model_type": "phimoe", **MOE_TEXT, "intermediate_size": 12, "num_local_experts": 4}
OLMOE = {"model_type": "olmoe", **MOE_TEXT, "intermediate_size": 12, "num_experts": 4}
DEEPSEEK_V3 = {
    "model_type": "deepseek_v3", **MOE_TEXT, "intermediate_size": 24, "moe_intermediate_size": 12,
    "n_routed_experts": 4, "n_shared_experts": 1, "first_k_dense_replace": 0, "n_group": 1, "topk_group": 1,
    "q_lora_rank": 12, "kv_lora_rank": 8, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 8,
    "head_dim": 4, "num_key_value_heads": 2,
}  # fmt: skip
GLM4_MOE = {"model_type": "glm4_moe", **MOE_TEXT, "intermediate_size": 24, "moe_intermediate_size": 12,
            "n_routed_experts": 4, "n_shared_experts": 1, "first_k_dense_replace": 0, "n_group": 1,
            "topk_group": 1}  # fmt: skip
QWEN3_VL_MOE = {
    "model_type": "qwen3_vl_moe",
    "text_config": {**MOE_TEXT, "intermediate_size": 24, "moe_intermediate_size": 12, "num_experts": 4,
                    "rope_scaling": {"rope_type": "default", "mrope_section": [1, 1, 2]}},
    "vision_config": {"depth": 1, "hidden_size": 16, "intermediate_size": 8, "num_heads": 2, "out_hidden_size": 16,
                      "patch_size": 14, "spatial_merge_size": 1, "temporal_patch_size": 1,
                      "deepstack_visual_indexes": []},
}  # fmt: skip
QWEN3_5_MOE = {
    "model_type": "qwen3_5_moe_text", **MOE_TEXT, "num_hidden_layers": 2, "moe_intermediate_size": 12,
    "shared_expert_intermediate_size": 12, "num_experts": 4, "linear_key_head_dim": 8, "linear_value_head_dim": 8,
    "linear_num_key_heads": 2, "linear_num_value_heads": 2, "layer_types": ["linear_attention", "full_attention"],
}  # fmt: skip
GEMMA4_MOE = {
    "model_type": "gemma4_text", **MOE_TEXT, "num_hidden_layers": 1, "intermediate_size": 24,
    "enable_moe_block": True, "num_experts": 4, "top_k_experts": 2, "moe_intermediate_size": 12,
    "layer_types": ["full_attention"],
}  # fmt: skip
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def _shrunk(model_type: str) -> dict[str, Any]:
    """transformers' own config of ``model_type``, shrunk as the architecture sweep shrinks it."""
    import transformers
    from shrink import shrink

    return {**shrink(transformers.AutoConfig.for_model(model_type).to_dict()), "model_type": model_type}


FAMILIES = [
    # MoE experts fused by transformers on load from per-expert tensors (its conversion mapping)
    Family("qwen3-moe-experts-router-attention", QWEN3_MOE, "AutoModelForCausalLM",
           {"target_parameters": [*EXPERTS, "mlp.gate.weight"], "target_modules": ["q_proj", "o_proj"]},
           experts_changed=12),
    Family("qwen2-moe-experts-shared-expert", QWEN2_MOE, "AutoModelForCausalLM",
           {"target_parameters": EXPERTS, "target_modules": ["shared_expert.gate_proj", "shared_expert.down_proj",
                                                             "shared_expert_gate", "v_proj"]},
           experts_changed=12),
    Family("mixtral-experts-renamed-block-sparse-moe", MIXTRAL, "AutoModelForCausalLM",
           {"target_parameters": [*EXPERTS, "mlp.gate.weight"], "target_modules": ["k_proj"]}, experts_changed=12),
    Family("deepseek-v3-experts-mla-attention", DEEPSEEK_V3, "AutoModelForCausalLM",
           {"target_parameters": EXPERTS, "target_modules": ["q_a_proj", "kv_b_proj", "o_proj"]},
           experts_changed=12),
    Family("qwen3.5-moe-hybrid-experts-shared-expert", QWEN3_5_MOE, "AutoModelForCausalLM",
           {"target_parameters": EXPERTS, "target_modules": ["shared_expert.gate_proj", "in_proj_qkv", "q_proj"]},
           experts_changed=24),
    Family("gemma4-moe-experts", GEMMA4_MOE, "AutoModelForCausalLM",
           {"target_parameters": ["experts.gate_up_proj", "experts.down_proj"], "target_modules": ["q_proj"]},
           experts_changed=2),
    Family("phimoe-router-renamed-from-gate", PHIMOE, "AutoModelForCausalLM",
           {"target_parameters": [*EXPERTS, "mlp.router.weight"], "target_modules": ["q_proj"]}, experts_changed=12),
    Family("olmoe-experts", OLMOE, "AutoModelForCausalLM",
           {"target_parameters": EXPERTS, "target_modules": ["q_proj"]}, experts_changed=12),
    Family("glm4-moe-down-proj-only", GLM4_MOE, "AutoModelForCausalLM",
           {"target_parameters": ["mlp.experts.down_proj"], "target_modules": ["q_proj"]}, experts_changed=4),
    Family("qwen3-vl-moe-experts-stored-transposed", QWEN3_VL_MOE, "Qwen3VLMoeForConditionalGeneration",
           {"target_parameters": EXPERTS, "target_modules": ["q_proj"]}, experts_changed=2),
    # PEFT's own default on a fused MoE: "all-linear" saves the experts and the router as bare parameter names
    # (target_parameters ["gate_up_proj", "down_proj", "gate.weight"]), nested on one module, with gate_up's r
    # and alpha doubled in rank_pattern/alpha_pattern under the wrapped parameter's name
    *(Family(f"{config['model_type']}-all-linear-bare-parameter-names", config, "AutoModelForCausalLM",
             {"target_modules": "all-linear"}, experts_changed=-1)
      for config in (QWEN3_MOE, MIXTRAL, OLMOE, DEEPSEEK_V3, GLM4_MOE)),
    # ShieldGemma 2's own class: its checkpoint stores model.language_model.model.layers.* (PrefixChange on load);
    # all-linear takes its lm_head, tied to the embeddings; bf16 only, as its forward needs images (the bits against
    # PEFT's merge and verify are what is checked)
    Family("shieldgemma2-image-classification-all-linear", _shrunk("shieldgemma2"),
           "ShieldGemma2ForImageClassification", {"target_modules": "all-linear"}, dtypes=("bfloat16",),
           peft_merge_wrong=ONE_SIDED_TIE),
    Family("switch-transformers-moe-per-expert-linear", SWITCH, "SwitchTransformersForConditionalGeneration",
           {"target_modules": ["wi", "wo", "classifier", "q"]}, inputs="seq2seq",
           experts_changed=32),
    Family("bart-lora-lm-head", BART, "BartForConditionalGeneration", {"target_modules": ["lm_head", "q_proj"]},
           inputs="seq2seq", peft_merge_wrong=ONE_SIDED_TIE,
           untied=("model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight", "lm_head.weight")),
    Family("bart-lora-embeddings", BART, "BartForConditionalGeneration", {"target_modules": ["embed_tokens"]},
           inputs="seq2seq", peft_merge_wrong=ONE_SIDED_TIE),
    Family("t5-original-config-lora-lm-head", T5, "T5ForConditionalGeneration", {"target_modules": ["lm_head", "q"]},
           tweak=_original_t5_config, inputs="seq2seq", peft_merge_wrong=ONE_SIDED_TIE, untied=("lm_head.weight",)),
    Family("t5-lora-wo-kept-in-float32", T5, "T5ForConditionalGeneration", {"target_modules": ["wo", "k"]},
           inputs="seq2seq", dtypes=("float32", "float16")),
    Family("whisper", WHISPER, "WhisperForConditionalGeneration", {"target_modules": ["q_proj", "v_proj", "fc1"]},
           inputs="speech"),
    Family("qwen2-tied-stored-as-lm-head", QWEN2_TIED, "AutoModelForCausalLM",
           {"target_modules": ["embed_tokens", "q_proj"]}, tweak=_stored_under_lm_head,
           peft_merge_wrong=ONE_SIDED_TIE),
    Family("qwen2-modules-to-save-embeddings-ensure-weight-tying", QWEN2_TIED, "AutoModelForCausalLM",
           {"target_modules": ["q_proj"], "modules_to_save": ["embed_tokens"], "ensure_weight_tying": True}),
    Family("gemma2-tied-lora-lm-head", GEMMA2, "AutoModelForCausalLM", {"target_modules": ["lm_head", "o_proj"]},
           peft_merge_wrong=ONE_SIDED_TIE),
    Family("roberta-seq-cls-on-masked-lm", ROBERTA, "AutoModelForSequenceClassification",
           {"target_modules": ["query", "value"], "task_type": "SEQ_CLS"}, base_class="RobertaForMaskedLM"),
    Family("gemma3-vlm-modules-to-save-lm-head", GEMMA3, "Gemma3ForConditionalGeneration",
           {"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]}, untied=("lm_head.weight",)),
    Family("gemma3-vlm-both-towers", GEMMA3, "Gemma3ForConditionalGeneration", {"target_modules": TOWERS}),
    Family("llava-legacy-names-both-towers", LLAVA, "LlavaForConditionalGeneration", {"target_modules": TOWERS},
           tweak=_legacy_llava_names),
    Family("mistral3-both-towers", MISTRAL3, "Mistral3ForConditionalGeneration", {"target_modules": TOWERS}),
    Family("idefics3-both-towers", IDEFICS3, "Idefics3ForConditionalGeneration", {"target_modules": TOWERS}),
    Family("qwen2-vl-both-towers", QWEN2_VL, "Qwen2VLForConditionalGeneration", {"target_modules": TOWERS}),
]  # fmt: skip


def _inputs(family: Family, config: dict[str, Any]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    vocab = int(config.get("vocab_size") or config.get("text_config", {}).get("vocab_size") or 50)
    ids = torch.randint(3, vocab, (1, 9), generator=g)
    if family.inputs == "speech":
        feats = torch.randn(1, config["num_mel_bins"], 2 * config["max_source_positions"], generator=g)
        return {"input_features": feats, "decoder_input_ids": ids[:, :5]}
    if family.inputs == "seq2seq":
        return {"input_ids": ids, "decoder_input_ids": ids[:, :5]}
    return {"input_ids": ids}


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.id)
def test_family_merges_as_base_plus_adapter(family: Family, tmp_path: Path) -> None:
    for dtype in family.dtypes:
        _check_family(family, dtype, tmp_path / dtype)


def _check_family(family: Family, dtype: str, tmp: Path) -> None:
    base = build_model(tmp / "base", family.config, model_class=family.base_class or family.model_class, dtype=dtype)
    if family.tweak:
        family.tweak(base)
    adapter = build_adapter(base, tmp / "adapter", model_class=family.model_class, **family.lora)
    result = merge(base, adapter, tmp / "merged", progress=False)
    ours = load_tensors(tmp / "merged")
    for name in family.untied:
        assert name in ours, f"{name} must be stored on its own once untied"
    before = load_tensors(base)
    changed = [n for n in ours if "experts." in n and n in before and not torch.equal(ours[n], before[n])]
    if family.experts_changed >= 0:
        assert len(changed) == family.experts_changed, changed
    else:  # as many as PEFT's all-linear targets (0.22 adds the shared experts): bit-identity with PEFT decides
        assert changed

    # 1. outputs: the merged model with plain transformers == base + adapter through PEFT, unmerged
    if dtype == "float32":
        inputs = _inputs(family, family.config)
        reference = peft_outputs(base, adapter, inputs, model_class=family.model_class)
        merged = plain_outputs(tmp / "merged", inputs, model_class=family.model_class)
        untouched = plain_outputs(base, inputs, model_class=family.model_class)
        effect = (reference - untouched).abs().max().item()
        error = (reference - merged).abs().max().item()
        assert effect > 1e-3, "the adapter must change the outputs for this test to mean anything"
        assert error <= 1e-4 * max(1.0, effect), f"merged differs from base + adapter by {error} (effect {effect})"

    # 2. tensors: bit-identical to PEFT's merge, where PEFT's merge is right
    theirs = peft_reference(base, adapter, tmp / "peft", model_class=family.model_class, dtype=getattr(torch, dtype))
    differing = []
    for name in sorted(set(ours) & set(theirs)):
        a, b = ours[name], theirs[name]
        if a.dtype != b.dtype and torch.equal(a.to(b.dtype), b):
            continue  # transformers kept it in float32 on load; the values are ours
        if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(bits(a), bits(b)):
            differing.append(name)
    if family.peft_merge_wrong:  # PEFT changes the shared tensor, or keeps it tied where ours is untied
        assert differing or set(ours) - set(theirs), f"PEFT's merge was expected to differ ({family.peft_merge_wrong})"
    else:
        assert differing == [], f"not bit-identical to PEFT's merge: {differing}"

    # 3. verify --weights-only passes, with transformers + PEFT agreeing on every name
    report = verify(base, adapter, tmp / "merged", outputs=False)
    assert report.passed, report.failed_checks
    names = next(c for c in report.checks if c.name == "names and tying (transformers + PEFT)")
    assert names.passed is True, names.measured
    assert result.prepared.names is not None and result.prepared.names.agrees


@pytest.mark.parametrize(
    ("config", "pretraining_class", "head"),
    [(ROBERTA, "RobertaForMaskedLM", "lm_head."), ({**ROBERTA, "model_type": "bert"}, "BertForPreTraining", "cls.")],
    ids=["roberta-masked-lm", "bert-pretraining"],
)
def test_classifier_on_a_pretraining_checkpoint_holds_the_classifiers_tensors(
    config: dict[str, Any], pretraining_class: str, head: str, tmp_path: Path
) -> None:
    """A sequence-classification adapter trained on a pretraining checkpoint: the merged folder holds exactly the
    tensors of the class the adapter was trained as (PEFT's saved merge), without the base's pretraining head, and
    the plan names what it leaves out."""
    base = build_model(tmp_path / "base", config, model_class=pretraining_class)
    model_class = "AutoModelForSequenceClassification"
    adapter = build_adapter(base, tmp_path / "adapter", model_class=model_class, target_modules=["query", "value"],
                            task_type="SEQ_CLS")  # fmt: skip
    result = merge(base, adapter, tmp_path / "merged", progress=False)
    ours = load_tensors(tmp_path / "merged")
    theirs = peft_reference(base, adapter, tmp_path / "peft", model_class=model_class)
    assert sorted(ours) == sorted(theirs)
    assert all(torch.equal(bits(ours[n]), bits(theirs[n])) for n in ours)
    dropped = sorted(n for n in load_tensors(base) if n.startswith(head))
    assert dropped and not set(dropped) & set(ours)
    note = next(n for n in result.prepared.plan.notes if "does not load" in n)
    assert note.startswith(f"{len(dropped)} base tensor(s) that ")
    assert note.endswith(
        "the base's own head) are left out of the merged folder, as PEFT's saved merge leaves them out."
    )
    assert verify(base, adapter, tmp_path / "merged", outputs=False).passed
