"""Planning is pure: synthetic tensor headers in, a plan out (no model, no tensor data)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from loraship.engine.adapter import PREFIX, parse_adapter
from loraship.engine.model_map import ModelMap
from loraship.engine.plan import LoraStep
from loraship.engine.planner import NameResolver, plan_merge
from loraship.engine.safetensors_io import Checkpoint, TensorInfo
from loraship.errors import IncompatibleError, UnsupportedError

FOLDER = Path("/adapters/demo")


def info(name: str, shape: tuple[int, ...], dtype: str = "F32") -> TensorInfo:
    return TensorInfo(name, dtype, shape, Path("/x.safetensors"), 0, 4 * math.prod(shape))


def checkpoint(**tensors: tuple[int, ...]) -> Checkpoint:
    return Checkpoint(
        Path("/base"), (), {n.replace("__", "."): info(n.replace("__", "."), s) for n, s in tensors.items()}
    )


def lora(module: str, r: int, in_f: int, out_f: int, **config: Any) -> dict[str, TensorInfo]:
    return {
        f"{PREFIX}{module}.lora_A.weight": info(f"{PREFIX}{module}.lora_A.weight", (r, in_f)),
        f"{PREFIX}{module}.lora_B.weight": info(f"{PREFIX}{module}.lora_B.weight", (out_f, r)),
    }


def model_map(*params: str, embed: str = "model.embed", head: str | None = "lm_head") -> ModelMap:
    """transformers' view of an untied model whose parameters are stored under their own names."""
    same = {p: p for p in params}
    return ModelMap("TestForCausalLM", "model", tuple(params), same, same, input_embedding=embed, output_embedding=head)


def adapter(tensors: dict[str, TensorInfo], **config: Any):  # type: ignore[no-untyped-def]
    return parse_adapter({"peft_type": "LORA", "r": 4, "lora_alpha": 8, **config}, tensors, folder=FOLDER)


def test_resolver_tolerates_wrapper_prefixes() -> None:
    r = NameResolver(["h.0.attn.c_attn.weight", "model.layers.0.q_proj.weight", "lm_head.weight"])
    assert r.resolve("transformer.h.0.attn.c_attn", "weight") == "h.0.attn.c_attn.weight"  # base saved bare
    assert r.resolve("layers.0.q_proj", "weight") == "model.layers.0.q_proj.weight"  # adapter trained bare
    assert r.resolve("lm_head", "weight") == "lm_head.weight"
    assert r.resolve("model.layers.1.q_proj", "weight") is None


def test_rank_and_alpha_patterns_use_first_matching_key_in_order() -> None:
    tensors = {**lora("model.layers.0.mlp.up_proj", 6, 8, 8), **lora("model.layers.1.mlp.up_proj", 2, 8, 8)}
    spec = adapter(tensors, rank_pattern={"layers.0.mlp.up_proj": 6, "up_proj": 2},
                   alpha_pattern={"up_proj": 3, "layers.0.mlp.up_proj": 12})  # fmt: skip
    scales = {m.module: (m.rank, m.alpha, m.scale) for m in spec.lora_modules}
    assert scales == {"model.layers.0.mlp.up_proj": (6, 3.0, 0.5), "model.layers.1.mlp.up_proj": (2, 3.0, 1.5)}


def test_rslora_scale() -> None:
    spec = adapter(lora("q", 16, 8, 8), r=16, lora_alpha=32, use_rslora=True)
    assert spec.lora_modules[0].scale == 32 / 4


def test_square_conv1d_layers_follow_the_architecture() -> None:
    base = checkpoint(
        **{"transformer__h__0__attn__c_proj__weight": (8, 8), "transformer__h__0__mlp__c_fc__weight": (8, 32)}
    )
    spec = adapter({**lora("transformer.h.0.attn.c_proj", 2, 8, 8), **lora("transformer.h.0.mlp.c_fc", 2, 8, 32)},
                   fan_in_fan_out=True)  # fmt: skip
    plan = plan_merge(base, {"model_type": "gpt2"}, spec)
    layouts = {t.name: t.steps[0].layout for t in plan.changed if isinstance(t.steps[0], LoraStep)}
    assert layouts == {"transformer.h.0.attn.c_proj.weight": "conv1d", "transformer.h.0.mlp.c_fc.weight": "conv1d"}
    llama = plan_merge(checkpoint(model__q__weight=(8, 8)), {"model_type": "llama"}, adapter(lora("model.q", 2, 8, 8),
                       fan_in_fan_out=True))  # fmt: skip
    assert llama.changed[0].steps[0].layout == "linear"  # type: ignore[union-attr]
    assert llama.notes == (
        "adapter_config.json sets fan_in_fan_out=true, but `model.q.weight` is stored as (out, in) (an nn.Linear): "
        "merged as fan_in_fan_out=false, as PEFT does.",
    )


def test_grouped_convolution_refused() -> None:
    base = checkpoint(conv__weight=(8, 2, 3, 3))  # 8 out, 8 in, groups=4
    tensors = {
        f"{PREFIX}conv.lora_A.weight": info(f"{PREFIX}conv.lora_A.weight", (2, 8, 3, 3)),
        f"{PREFIX}conv.lora_B.weight": info(f"{PREFIX}conv.lora_B.weight", (8, 2, 1, 1)),
    }
    with pytest.raises(UnsupportedError) as e:
        plan_merge(base, {"model_type": "resnet"}, adapter(tensors))
    assert e.value.message == (
        "`conv.weight` is a grouped convolution (4 groups): PEFT cannot merge a LoRA into grouped convolutions, "
        "and neither can loraship."
    )


def test_lora_bias_needs_a_base_bias() -> None:
    tensors = {**lora("model.q", 2, 8, 8), f"{PREFIX}model.q.lora_B.bias": info(f"{PREFIX}model.q.lora_B.bias", (8,))}
    with pytest.raises(IncompatibleError) as e:
        plan_merge(checkpoint(model__q__weight=(8, 8)), {}, adapter(tensors, lora_bias=True))
    assert e.value.message == (
        "The adapter has a LoRA bias (lora_bias=True) for `model.q`, but the base layer `model.q.weight` has no "
        "bias to add it to."
    )


def test_every_adapter_tensor_is_accounted_for() -> None:
    tensors = {
        **lora("model.q", 2, 8, 8),
        f"{PREFIX}lm_head.weight": info(f"{PREFIX}lm_head.weight", (10, 8)),
        f"{PREFIX}lm_head.original_module.weight": info(f"{PREFIX}lm_head.original_module.weight", (10, 8)),
    }
    base = checkpoint(model__q__weight=(8, 8), lm_head__weight=(10, 8))
    plan = plan_merge(base, {"vocab_size": 10}, adapter(tensors, modules_to_save=["lm_head"]),
                      model=model_map("model.q.weight", "lm_head.weight"))  # fmt: skip
    assert plan.accounting == {
        f"{PREFIX}model.q.lora_A.weight": "model.q.weight",
        f"{PREFIX}model.q.lora_B.weight": "model.q.weight",
        f"{PREFIX}lm_head.weight": "lm_head.weight",
        f"{PREFIX}lm_head.original_module.weight": "(ignored: PEFT's copy of the original module, kept unchanged)",
    }


def test_unexplained_adapter_tensors_are_an_error() -> None:
    tensors = {**lora("model.q", 2, 8, 8), f"{PREFIX}lm_head.weight": info(f"{PREFIX}lm_head.weight", (10, 8))}
    with pytest.raises(Exception) as e:
        adapter(tensors)
    assert str(e.value).startswith(
        f"`{FOLDER}` holds 1 tensor(s) that are neither LoRA weights nor covered by modules_to_save or bias in "
        f"adapter_config.json: `{PREFIX}lm_head.weight`."
    )


def test_one_sided_vocabulary_resize_refused() -> None:
    base = checkpoint(model__embed__weight=(10, 8), lm_head__weight=(10, 8))
    tensors = {f"{PREFIX}model.embed.weight": info(f"{PREFIX}model.embed.weight", (12, 8))}
    with pytest.raises(IncompatibleError) as e:
        plan_merge(base, {"vocab_size": 10}, adapter(tensors, modules_to_save=["embed"]),
                   model=model_map("model.embed.weight", "lm_head.weight"))  # fmt: skip
    assert e.value.message == (
        "The adapter resizes the vocabulary inconsistently: it saves `model.embed.weight` to 12 rows; "
        "`lm_head.weight` stays at 10 rows."
    )


def test_non_float_base_tensor_refused() -> None:
    base = Checkpoint(Path("/b"), (), {"model.q.weight": info("model.q.weight", (8, 8), dtype="I8")})
    with pytest.raises(Exception) as e:
        plan_merge(base, {}, adapter(lora("model.q", 2, 8, 8)), base_label="org/model-int8")
    assert str(e.value).startswith(
        "`model.q.weight` in the base model `org/model-int8` is stored as I8, not as a floating-point tensor: it is "
        "quantized, and a LoRA delta cannot be merged into it."
    )
