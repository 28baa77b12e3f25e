"""Quantized bases: block-scaled FP8 is dequantized while streaming, bit-identical to transformers'
own dequantization (FineGrainedFP8Config(dequantize=True)) + PEFT's merge + save_pretrained; the
output is a plain 16-bit model without quantization_config; other formats stay refused."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import bits, load_tensors
from test_families import QWEN3_MOE

from loraship.check.verify import verify
from loraship.engine.merge import merge
from loraship.tiny import build_adapter, build_model, quantize_fp8, quantize_mxfp4

DENSE = {
    "model_type": "qwen3", "vocab_size": 64, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 1,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
}  # fmt: skip


WIDE = {**DENSE, "hidden_size": 1024, "intermediate_size": 512, "vocab_size": 32}  # rows in several blocks

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
        (WIDE, (128, 128), {"target_modules": ["gate_proj", "down_proj"]}),
    ],
    ids=["dense-32x32", "dense-uneven-grid", "qwen3-moe-per-expert-fp8", "wide-row-groups-on-workers"],
)
def test_fp8_base_is_dequantized_bit_identically(
    config: dict, block: tuple[int, int], lora: dict, tmp_path: Path, monkeypatch
) -> None:
    from loraship.engine.stream import TensorStreamer

    grouped: list[tuple[str, int]] = []  # (tensor, first row) of each row block computed on the workers
    compute_group = TensorStreamer._compute_group
    monkeypatch.setattr(TensorStreamer, "_compute_group", lambda self, t, source, blocks, lora: (
        grouped.extend((t.name, b[0]) for b in blocks), compute_group(self, t, source, blocks, lora))[1])  # fmt: skip
    base = quantize_fp8(build_model(tmp_path / "base", config, dtype="bfloat16"), block=block)
    adapter = build_adapter(base, tmp_path / "adapter", **lora)
    result = merge(base, adapter, tmp_path / "merged", progress=False)
    if config is WIDE:  # LoRA on several row blocks, each starting on a 128-row scale block
        starts = [first for name, first in grouped if name == "model.layers.0.mlp.down_proj.weight"]
        assert len(starts) > 1 and all(first % 128 == 0 for first in starts)
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


def _transformers_fp8_quantize(name: str, value: torch.Tensor, block: tuple[int, int], scale_fmt: str) -> dict:
    """transformers' own quantization op (what FineGrainedFP8Config applies when it quantizes a model)."""
    from types import SimpleNamespace

    from transformers import FineGrainedFP8Config
    from transformers.integrations.finegrained_fp8 import Fp8Quantize

    config = FineGrainedFP8Config(weight_block_size=list(block), scale_fmt=scale_fmt)
    return Fp8Quantize(SimpleNamespace(quantization_config=config)).convert({name: value})


@pytest.mark.parametrize(
    ("config", "block", "lora", "scale_fmt"),
    [
        (DENSE, (32, 32), {"target_modules": ["q_proj", "down_proj"]}, "float"),
        (DENSE, (48, 32), {"target_modules": ["k_proj", "gate_proj"], "use_rslora": True}, "ue8m0"),
        (
            {**QWEN3_MOE, "moe_intermediate_size": 16},
            (8, 8),
            {"target_parameters": ["mlp.experts.gate_up_proj"], "target_modules": ["q_proj"], "r": 8},
            "float",
        ),
    ],
    ids=["dense-32x32", "dense-uneven-grid-ue8m0", "qwen3-moe-per-expert-fp8"],
)
def test_requantize_writes_fp8_as_transformers_quantizes_the_peft_merge(
    config: dict, block: tuple[int, int], lora: dict, scale_fmt: str, tmp_path: Path
) -> None:
    base = quantize_fp8(build_model(tmp_path / "base", config, dtype="bfloat16"), block=block)
    if scale_fmt == "ue8m0":
        base_config = json.loads((base / "config.json").read_text())
        base_config["quantization_config"]["scale_fmt"] = "ue8m0"
        (base / "config.json").write_text(json.dumps(base_config))
    adapter = build_adapter(base, tmp_path / "adapter", **lora)
    result = merge(base, adapter, tmp_path / "merged", progress=False, requantize=True)
    ours, base_tensors = load_tensors(tmp_path / "merged"), load_tensors(base)
    peft = _peft_on_dequantized(base, adapter, tmp_path / "peft")
    assert set(ours) == set(base_tensors)  # the base's names: weights and their scales
    expected: dict[str, torch.Tensor] = {}
    changed = [n for n, t in base_tensors.items() if t.dtype == torch.float8_e4m3fn and n in peft
               and not torch.equal(bits(peft[n]), bits(_dequantized(base_tensors, n)))]  # fmt: skip
    assert changed
    for name, value in base_tensors.items():
        if name in changed:  # scales keep the base's dtype (float32; transformers' op gives E8M0 for ue8m0)
            grid = base_tensors[f"{name}_scale_inv"].shape  # each weight keeps the base's own grid (an uneven
            own = (value.shape[0] // grid[0], value.shape[1] // grid[1])  # weight has one block fewer rows)
            q = _transformers_fp8_quantize(name, peft[name], own, scale_fmt)
            expected |= {n: v.to(base_tensors[n].dtype) for n, v in q.items()}
            assert torch.equal(expected[f"{name}_scale_inv"].to(q[f"{name}_scale_inv"].dtype), q[f"{name}_scale_inv"])
        elif name not in expected:
            expected[name] = value if value.dtype == torch.float8_e4m3fn or name.endswith("_scale_inv") else peft[name]
    differing = [
        n for n in ours if ours[n].dtype != expected[n].dtype or not torch.equal(bits(ours[n]), bits(expected[n]))
    ]
    assert differing == []
    config_out = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config_out["quantization_config"]["quant_method"] == "fp8"
    fp8 = sum(1 for t in base_tensors.values() if t.dtype == torch.float8_e4m3fn)
    note = f"--requantize: the base is quantized (FP8, {block[0]}×{block[1]} blocks): the adapter changes"
    assert any(n.startswith(f"{note} {len(changed)} of its {fp8} FP8 weights, which") for n in result.prepared.notes)

    report = verify(base, adapter, tmp_path / "merged", threshold_overrides={"generation_tokens": 8})
    assert report.passed, report.failed_checks
    assert report.weights.exact == report.weights.changed  # each FP8 weight and its new scales, bit for bit
    assert report.weights.changed >= 2 * len(changed)
    checks = {c.name: c for c in report.checks}
    ratio = checks["merge error / adapter effect"]
    assert ratio.passed is True and ratio.required == "≤ 0.5 (no-op: 1)"
    assert re.search(r"; about \d+% of the adapter's effect survives requantization$", ratio.measured)
    assert (checks["top-1 agreement"].passed, checks["top-1 agreement"].required) == (None, "reported (requantized)")


def _dequantized(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    from loraship.engine.quantized import dequantize_fp8

    return dequantize_fp8(tensors[name], tensors[f"{name}_scale_inv"], torch.bfloat16)


def test_requantize_that_erases_the_adapter_fails_verification_with_the_16_bit_fix(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from loraship.check.verify import raise_if_failed
    from loraship.errors import VerificationFailed

    base = quantize_fp8(build_model(tmp_path / "base", DENSE, dtype="bfloat16"), block=(32, 32))
    adapter = build_adapter(base, tmp_path / "adapter", target_modules=["q_proj", "v_proj", "down_proj"])
    path = adapter / "adapter_model.safetensors"
    weak = {n: t * 1e-3 if "lora_B" in n else t for n, t in load_file(path).items()}  # a tiny adapter effect
    save_file(weak, path, metadata={"format": "pt"})
    merge(base, adapter, tmp_path / "merged", progress=False, requantize=True)
    report = verify(base, adapter, tmp_path / "merged", threshold_overrides={"generation_tokens": 4})
    assert report.failed_checks == ["outputs: merge error / adapter effect"]
    with pytest.raises(VerificationFailed) as e:
        raise_if_failed(report)
    assert e.value.message == (
        "The merged weights are requantized exactly as planned, but FP8 rounds away too much of this adapter's "
        "effect: outputs: merge error / adapter effect."
    )
    assert e.value.fix == (
        "Publish in 16 bits: drop --requantize (in loraship.yaml `requantize: false`); or accept the loss with a "
        "higher `--max-error-ratio` (in loraship.yaml `verify: {max_error_ratio: ...}`)."
    )


@pytest.mark.parametrize("kind", ["mxfp4", "bf16"])
def test_requantize_is_refused_for_other_bases(kind: str, tmp_path: Path, capsys) -> None:
    from loraship.cli import main

    config = GPT_OSS if kind == "mxfp4" else DENSE
    base = build_model(tmp_path / "base", config, dtype="bfloat16")
    if kind == "mxfp4":
        quantize_mxfp4(base)
    adapter = build_adapter(base, tmp_path / "adapter", target_modules=["q_proj"])
    code = main(["merge", "--base", str(base), "--adapter", str(adapter), "--output", str(tmp_path / "out"),
                 "--requantize", "--quiet"])  # fmt: skip
    assert code == 1 and not (tmp_path / "out").exists()
    found = "MXFP4" if kind == "mxfp4" else "not quantized"
    assert capsys.readouterr().err == (
        "Error: --requantize writes the merged weights back in the base's format; loraship requantizes block-scaled "
        f"FP8 (float8_e4m3fn) only, and the base model `{base}` is {found}.\n"
        "Fix: Drop --requantize (in loraship.yaml: `requantize: false`): the merged model is written in 16 bits.\n"
    )


def test_plan_shows_requantization(tmp_path: Path, capsys) -> None:
    from loraship.cli import main

    base = quantize_fp8(build_model(tmp_path / "base", DENSE, dtype="bfloat16"), block=(32, 32))
    adapter = build_adapter(base, tmp_path / "adapter", target_modules=["q_proj"])
    assert main(["plan", "--base", str(base), "--adapter", str(adapter), "--requantize", "--json"]) == 0
    changed = [
        (t["name"], t["dtype"], t["change"]) for t in json.loads(capsys.readouterr().out)["tensors"] if t["changed"]
    ]
    assert changed == [
        ("model.layers.0.self_attn.q_proj.weight", "F8_E4M3",
         "dequantize F8_E4M3 -> BF16; LoRA r=4 scale=2; quantize -> F8_E4M3 (32x32 blocks)"),
        ("model.layers.0.self_attn.q_proj.weight_scale_inv", "F32", "new block scales of the requantized weight"),
    ]  # fmt: skip


def test_run_with_requantize_publishes_fp8_and_the_card_says_so(tmp_path: Path, capsys) -> None:
    from huggingface_hub import ModelCard

    from loraship.cli import main

    base = quantize_fp8(build_model(tmp_path / "base", DENSE, dtype="bfloat16"), block=(32, 32))
    adapter = build_adapter(base, tmp_path / "adapter", target_modules=["q_proj", "v_proj"])
    out = tmp_path / "out"
    code = main(["run", "--adapter", str(adapter), "--base", str(base), "--output", f"dir:{out}", "--requantize",
                 "--quiet"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert load_tensors(out)["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float8_e4m3fn
    card = ModelCard.load(out / "README.md")
    assert "quantized again to the base's FP8, 32×32 blocks by loraship (lossy: see Verification" in card.text
    assert "of the adapter's effect survives requantization" in card.text
    assert "requantize: true" in card.text  # the job's YAML, to reproduce it
