"""Quantized bases: block-scaled FP8 is dequantized while streaming, bit-identical to transformers'
own dequantization (FineGrainedFP8Config(dequantize=True)) + PEFT's merge + save_pretrained; the
output is a plain 16-bit model without quantization_config; other formats stay refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import bits, load_tensors
from test_families import QWEN3_MOE

from loraship.merge import merge
from loraship.tiny import build_adapter, build_model, quantize_fp8, quantize_mxfp4
from loraship.verify import verify

DENSE = {
    "model_type": "qwen3", "vocab_size": 64, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 1,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
}  # fmt: skip


GPT_OSS = {  # experts (4, 64, 64) and (4, 32, 64): 32-value MXFP4 blocks along their inputs
    "model_type": "gpt_oss", "vocab_size": 32, "hidden_size": 64, "intermediate_size": 32, "num_hidden_layers": 1,
    "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 4, "num_experts_per_tok": 2,
    "head_dim": 16, "layer_types": ["full_attention"],
}  # fmt: skip


def _peft_on_dequantized(base: Path, adapter: Path, out: Path) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config, Mxfp4Config

    mxfp4 = "mxfp4" in (base / "config.json").read_text()
    dequantize = Mxfp4Config(dequantize=True) if mxfp4 else FineGrainedFP8Config(dequantize=True)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16, quantization_config=dequantize)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.hf_quantizer = None  # save the dequantized model as it is in memory (not quantized again)
    merged._weight_conversions = None
    if hasattr(merged.config, "quantization_config"):
        del merged.config.quantization_config
    merged.save_pretrained(out)
    return load_tensors(out)


@pytest.mark.parametrize(
    ("config", "block", "lora"),
    [
        (DENSE, (32, 32), {"target_modules": ["q_proj", "down_proj"]}),
        (DENSE, (48, 32), {"target_modules": ["k_proj", "gate_proj"]}),  # 96 rows: blocks as transformers derives
        (
            {**QWEN3_MOE, "moe_intermediate_size": 16},
            (8, 8),
            {
                "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
                "target_modules": ["q_proj"],
                "r": 8,
            },
        ),
    ],
    ids=["dense-32x32", "dense-uneven-grid", "qwen3-moe-per-expert-fp8"],
)
def test_fp8_base_is_dequantized_bit_identically(
    config: dict, block: tuple[int, int], lora: dict, tmp_path: Path
) -> None:
    base = quantize_fp8(build_model(tmp_path / "base", config, dtype="bfloat16"), block=block)
    adapter = build_adapter(base, tmp_path / "adapter", **lora)
    result = merge(base, adapter, tmp_path / "merged", progress=False)
    ours = load_tensors(tmp_path / "merged")
    theirs = _peft_on_dequantized(base, adapter, tmp_path / "peft")
    assert set(ours) == set(theirs)
    assert not any(n.endswith("_scale_inv") for n in ours)
    differing = [n for n in ours if ours[n].dtype != theirs[n].dtype or not torch.equal(bits(ours[n]), bits(theirs[n]))]
    assert differing == []
    assert {t.dtype for t in ours.values()} == {torch.bfloat16}
    config_out = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config_out
    quantized = sum(1 for t in load_tensors(base).values() if t.dtype == torch.float8_e4m3fn)
    note = f"The base is quantized (FP8, {block[0]}×{block[1]} blocks): its {quantized} quantized weights are"
    assert any(n.startswith(note) for n in result.prepared.notes)

    report = verify(base, adapter, tmp_path / "merged")
    assert report.passed, report.failed_checks
    ratio = next(c for c in report.checks if c.name == "merge error / adapter effect")
    assert ratio.passed is True


def test_mxfp4_base_is_dequantized_bit_identically(tmp_path: Path) -> None:
    base = quantize_mxfp4(build_model(tmp_path / "base", GPT_OSS, dtype="bfloat16"))
    adapter = build_adapter(base, tmp_path / "adapter", target_parameters=["mlp.experts.gate_up_proj",
                            "mlp.experts.down_proj"], target_modules=["q_proj"], r=8)  # fmt: skip
    result = merge(base, adapter, tmp_path / "merged", progress=False)
    ours = load_tensors(tmp_path / "merged")
    theirs = _peft_on_dequantized(base, adapter, tmp_path / "peft")
    assert set(ours) == set(theirs)
    assert ours["model.layers.0.mlp.experts.gate_up_proj"].shape == (4, 64, 64)
    differing = [n for n in ours if ours[n].dtype != theirs[n].dtype or not torch.equal(bits(ours[n]), bits(theirs[n]))]
    assert differing == []
    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())
    note = "The base is quantized (MXFP4): its 2 quantized weights are dequantized as transformers dequantizes them"
    assert any(n.startswith(note + " (Mxfp4Config(dequantize=True))") for n in result.prepared.notes)
    report = verify(base, adapter, tmp_path / "merged")
    assert report.passed, report.failed_checks
