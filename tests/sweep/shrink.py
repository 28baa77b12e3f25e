"""Tiny random configs for any architecture the installed transformers ships, built from its own config classes.

A config class's defaults describe a real (often huge) model. :func:`tiny_config` keeps everything that decides
the architecture (attention kind, MoE layout, tying, layer types) and shrinks every size field by its name, in
nested text/vision/audio/encoder/decoder configs too: widths to 16-32, heads to 2, layers to 2, experts to 4,
vocabularies to 96. Names no rule knows keep their default; a config that then fails to build is reported by the
sweep as a config it could not make, not as a merge failure.
"""

from __future__ import annotations

import math
from typing import Any

HIDDEN = 32
HEADS = 2
HEAD_DIM = HIDDEN // HEADS
LAYERS = 2
EXPERTS = 4
VOCAB = 96

#: Exact field names -> tiny value (applied at any nesting depth).
FIXED: dict[str, int] = {
    # widths
    "hidden_size": HIDDEN, "d_model": HIDDEN, "n_embd": HIDDEN, "dim": HIDDEN, "embed_dim": HIDDEN,
    "model_dim": HIDDEN, "n_embed": HIDDEN, "word_embed_proj_dim": HIDDEN, "embedding_size": HIDDEN,
    "projection_dim": HIDDEN, "out_hidden_size": HIDDEN, "text_hidden_size": HIDDEN, "vision_hidden_size": HIDDEN,
    "hidden_dim": HIDDEN, "audio_hidden_size": HIDDEN, "proj_dim": HIDDEN,
    # feed-forward widths
    "intermediate_size": 48, "ffn_dim": 48, "d_ff": 48, "n_inner": 48, "ffn_hidden_size": 48,
    "encoder_ffn_dim": 48, "decoder_ffn_dim": 48, "moe_intermediate_size": 24, "expert_intermediate_size": 24,
    "shared_expert_intermediate_size": 24, "mlp_dim": 48, "ff_dim": 48, "inner_hidden_size": 48,
    "dense_intermediate_size": 48, "moe_ffn_hidden_size": 24, "shared_intermediate_size": 24,
    # heads
    "num_attention_heads": HEADS, "n_head": HEADS, "num_heads": HEADS, "n_heads": HEADS,
    "encoder_attention_heads": HEADS, "decoder_attention_heads": HEADS, "attention_heads": HEADS,
    "num_key_value_heads": 1, "n_kv_heads": 1, "num_kv_heads": 1, "multi_query_group_num": 1,
    "head_dim": HEAD_DIM, "kv_channels": HEAD_DIM, "attention_head_dim": HEAD_DIM,
    # layers
    "num_hidden_layers": LAYERS, "num_layers": LAYERS, "n_layer": LAYERS, "n_layers": LAYERS,
    "encoder_layers": LAYERS, "decoder_layers": LAYERS, "num_decoder_layers": LAYERS, "depth": LAYERS,
    "num_encoder_layers": LAYERS, "text_num_layers": LAYERS,
    # experts
    "num_experts": EXPERTS, "num_local_experts": EXPERTS, "n_routed_experts": EXPERTS, "moe_num_experts": EXPERTS,
    "num_experts_per_tok": 2, "top_k": 2, "moe_k": 2, "top_k_experts": 2, "moe_topk": 2, "num_selected_experts": 2,
    "n_group": 1, "topk_group": 1, "num_expert_group": 1, "topk_groups": 1,
    "first_k_dense_replace": 1, "moe_layer_start_index": 1, "first_dense_layers": 1,
    # multi-head latent attention (DeepSeek-V3 style)
    "q_lora_rank": 16, "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 16,
    "qk_head_dim": 16, "index_head_dim": 16, "index_n_heads": 2, "index_topk": 4,
    # linear attention / state space
    "linear_key_head_dim": 8, "linear_value_head_dim": 8, "linear_num_key_heads": 2, "linear_num_value_heads": 2,
    "state_size": 8, "ssm_state_size": 8, "mamba_d_state": 8, "mamba_n_heads": 2, "mamba_d_head": 16,
    "mamba_head_dim": 16, "mamba_expand": 2, "n_groups": 1, "mamba_n_groups": 1, "time_step_rank": 4,
    # vocabularies and positions
    "vocab_size": VOCAB, "max_position_embeddings": 128, "n_positions": 128, "max_seq_len": 128,
    "seq_length": 128, "n_ctx": 128, "max_sequence_length": 128,
    # vision
    "image_size": 28, "patch_size": 14, "num_channels": 3, "spatial_merge_size": 1, "temporal_patch_size": 1,
    "mm_tokens_per_image": 4,
}  # fmt: skip

#: Token ids that must stay inside the tiny vocabulary.
TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "cls_token_id", "unk_token_id",
             "decoder_start_token_id", "mask_token_id", "image_token_id", "image_token_index", "video_token_id",
             "vision_start_token_id", "vision_end_token_id", "boi_token_id", "eoi_token_id", "audio_token_id",
             "eos_token_index", "forced_eos_token_id", "forced_bos_token_id")  # fmt: skip

#: Per-layer lists whose length follows the layer count.
LAYER_LISTS = ("layer_types", "layers_block_type", "block_types", "attn_type_list", "mlp_only_layers",
               "attention_layers", "hybrid_override_pattern", "layer_block_types", "sliding_window_pattern_list",
               "no_rope_layers", "moe_layers", "moe_layer_freq_list", "full_attn_idxs")  # fmt: skip


def tiny_config(model_type: str) -> Any:
    """A tiny config of ``model_type`` from transformers' own config class (raises what transformers raises)."""
    import transformers

    config = transformers.AutoConfig.for_model(model_type)
    return config.__class__.from_dict(shrink(config.to_dict()))


def shrink(values: dict[str, Any]) -> dict[str, Any]:
    """A config dict with its size fields shrunk, sub-configs included."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict) and (
            "model_type" in value or key.endswith("_config") or key in ("encoder", "decoder")
        ):
            out[key] = shrink(value)
        elif key in FIXED and isinstance(value, int) and not isinstance(value, bool) and value > 0:
            out[key] = min(value, FIXED[key]) if key.endswith(("_id", "_index")) else FIXED[key]
        else:
            out[key] = value
    layers = next((out[k] for k in ("num_hidden_layers", "num_layers", "n_layer", "n_layers") if k in out), LAYERS)
    before = next((values[k] for k in ("num_hidden_layers", "num_layers", "n_layer", "n_layers") if k in values), None)
    per_layer = [k for k, v in out.items() if isinstance(v, list) and before and len(v) == before != layers]
    for key in [k for k in out if k in LAYER_LISTS or k.endswith("layer_types") or k in per_layer]:
        if isinstance(out.get(key), list) and out[key]:
            out[key] = _cut_layers(out[key], layers)
        elif isinstance(out.get(key), str) and len(out[key]) > layers:  # one letter per layer (hybrid patterns)
            out[key] = out[key][:layers]
    vocab = out.get("vocab_size")
    if isinstance(vocab, int):
        for key in TOKEN_IDS:
            v = out.get(key)
            if isinstance(v, int) and not isinstance(v, bool) and v >= vocab:
                out[key] = vocab - 1 - TOKEN_IDS.index(key) % 8
            elif isinstance(v, list):
                out[key] = [x if not isinstance(x, int) or x < vocab else vocab - 1 for x in v]
    if "qk_rope_head_dim" in out and "head_dim" in out:  # multi-head latent attention: rotary part only
        out["head_dim"] = out["qk_rope_head_dim"]
    heads = out.get("num_attention_heads")
    if isinstance(heads, int) and "kv_lora_rank" in out and "num_key_value_heads" in out:  # MLA: no grouped heads
        out["num_key_value_heads"] = heads
    elif isinstance(heads, int) and isinstance(out.get("num_key_value_heads"), int):
        out["num_key_value_heads"] = math.gcd(heads, out["num_key_value_heads"]) or 1
    for key in ("sliding_window", "attention_window", "local_attention", "chunk_size", "attention_chunk_size"):
        if isinstance(out.get(key), int) and not isinstance(out[key], bool) and out[key] > 8:
            out[key] = 8
    if isinstance(out.get("rope_scaling"), dict) and "mrope_section" in out["rope_scaling"]:
        out["rope_scaling"] = {**out["rope_scaling"], "mrope_section": _mrope(out)}
    if isinstance(out.get("rope_parameters"), dict) and "mrope_section" in out["rope_parameters"]:
        out["rope_parameters"] = {**out["rope_parameters"], "mrope_section": _mrope(out)}
    out.pop("quantization_config", None)
    if "num_layers_per_stack" in out:  # derived from num_hidden_layers when the config is built (HRM)
        out["num_layers_per_stack"], out["num_hidden_layers"] = None, 1
    for key in ("torch_dtype", "dtype"):
        if key in out:
            out[key] = "float32"
    return out


def _cut_layers(values: list[Any], layers: int) -> list[Any]:
    """The first ``layers`` entries, keeping one of each kind the list holds (a hybrid model keeps both kinds)."""
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return [v for v in values if v < layers] or [0]
    kinds = list(dict.fromkeys(values))
    if len(kinds) <= layers:
        picked = kinds + values[: layers - len(kinds)]
        return picked[:layers]
    return values[:layers]


def _mrope(config: dict[str, Any]) -> list[int]:
    """Rotary sections summing to half the head dimension."""
    head = int(
        config.get("head_dim") or (config.get("hidden_size", HIDDEN) // config.get("num_attention_heads", HEADS))
    )
    half = max(head // 2, 3)
    return [half - 2 * (half // 3), half // 3, half // 3]
