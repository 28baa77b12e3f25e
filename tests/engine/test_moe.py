"""MoE adapters beyond the family matrix (tests/engine/test_families.py covers LoRA on fused experts):

- adapters saved under transformers v4 (one LoRA per expert Linear, most MoE adapters on the Hub):
  merged by their own math into the per-expert tensors, checked against that math computed here;
  ``verify`` compares outputs with PEFT where PEFT converts them right, and says so where it does not
  (rsLoRA on fused gate/up: PEFT doubles r and alpha, so the scale is √2 × the adapter's);
- the plan shows what transformers' conversion does; conversions loraship cannot invert are refused.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import bits, load_tensors
from safetensors.torch import save_file
from test_families import MIXTRAL, QWEN3_MOE

from loraship.check.verify import verify
from loraship.console import format_plan, plan_json
from loraship.engine.merge import merge, prepare_merge
from loraship.engine.planner import plan_merge
from loraship.errors import UnsupportedError
from loraship.tiny import build_adapter, build_model

V4 = {  # model type -> (checkpoint module of the experts, per-expert layer names: gate, up, down)
    "qwen3_moe": (QWEN3_MOE, "mlp", ("gate_proj", "up_proj", "down_proj"), 12),
    "mixtral": (MIXTRAL, "block_sparse_moe", ("w1", "w3", "w2"), 12),
}


def _v4_adapter(base: Path, out: Path, model_type: str, *, rslora: bool, r: int = 4, alpha: int = 8) -> Path:
    """An adapter as PEFT saved it for a transformers v4 MoE: a LoRA on each expert's Linear layers."""
    config, block, names, inter = V4[model_type]
    hidden, experts = config["hidden_size"], config.get("num_experts") or config["num_local_experts"]
    g = torch.Generator().manual_seed(3)
    tensors = {}
    for e in range(experts):
        for name in names:
            module = f"base_model.model.model.layers.0.{block}.experts.{e}.{name}"
            fan_in, fan_out = (inter, hidden) if name == names[2] else (hidden, inter)
            tensors[f"{module}.lora_A.weight"] = torch.randn(r, fan_in, generator=g) * 0.3
            tensors[f"{module}.lora_B.weight"] = torch.randn(fan_out, r, generator=g) * 0.3
    out.mkdir(parents=True)
    save_file(tensors, out / "adapter_model.safetensors")
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "target_modules": list(names),
        "use_rslora": rslora, "base_model_name_or_path": str(base),
    }))  # fmt: skip
    return out


@pytest.mark.parametrize("model_type", sorted(V4))
@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
def test_transformers_v4_per_expert_adapter_merges_by_its_own_math(
    model_type: str, rslora: bool, tmp_path: Path
) -> None:
    config = V4[model_type][0]
    for dtype in ("float32", "bfloat16"):
        base = build_model(tmp_path / dtype / "base", config, dtype=dtype)
        adapter = _v4_adapter(base, tmp_path / dtype / "adapter", model_type, rslora=rslora)
        merge(base, adapter, tmp_path / dtype / "merged", progress=False)
        ours, before, lora = load_tensors(tmp_path / dtype / "merged"), load_tensors(base), load_tensors(adapter)
        scale = 8 / (2.0 if rslora else 4)  # alpha / sqrt(r) or alpha / r, r = 4
        checked = 0
        for key, a in lora.items():
            if ".lora_A." not in key:
                continue
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            b = lora[key.replace("lora_A", "lora_B")]
            w = before[f"{module}.weight"]
            expected = (w.float() + (b.float() @ a.float()) * scale).to(w.dtype)  # W + s·B·A, rounded once
            assert torch.equal(bits(ours[f"{module}.weight"]), bits(expected)), module
            checked += 1
        assert checked == 12

    report = verify(tmp_path / "float32" / "base", tmp_path / "float32" / "adapter", tmp_path / "float32" / "merged")
    assert report.passed, report.failed_checks
    outputs = [c for c in report.checks if c.level == "outputs"]
    if rslora:  # PEFT doubles r and alpha of the fused gate/up LoRA: √2 × the scale
        assert [(c.name, c.passed) for c in outputs] == [("reference (PEFT, unmerged)", None)]
        assert outputs[0].measured.startswith(
            "not valid: PEFT's conversion of this transformers-v4 adapter changes the experts' deltas: expert "
        )
        assert outputs[0].measured.endswith("of `model.layers.0.mlp.experts.gate_up_proj` [12:24] differs from the "
                                            "adapter's own scale·B·A by 0.41 of its size")  # fmt: skip
        assert any("the outputs were not compared; the weights were checked bit for bit" in n for n in report.notes)
    else:  # PEFT converts it right: the outputs are compared with it, and agree exactly
        ratio = next(c for c in outputs if c.name == "merge error / adapter effect")
        assert ratio.passed is True and ratio.measured.startswith("0 (mean KL 0 vs"), ratio.measured


def test_plan_shows_the_conversion(tmp_path: Path) -> None:
    base = build_model(tmp_path / "base", QWEN3_MOE)
    adapter = build_adapter(base, tmp_path / "adapter", target_parameters=["mlp.experts.gate_up_proj"])
    prepared = prepare_merge(base, adapter, scratch=tmp_path)
    up = next(t for t in prepared.plan.tensors if t.name == "model.layers.0.mlp.experts.3.up_proj.weight")
    assert up.describe() == "LoRA expert 3 of experts.gate_up_proj [12:24] r=4 scale=2"
    step = next(t for t in plan_json(prepared)["tensors"] if t["name"] == up.name)["steps"][0]
    assert step["expert"] == {"fused": "experts.gate_up_proj", "index": 3, "start": 12, "length": 12}
    text = format_plan(prepared)
    table = text.split("\n\n")[1].splitlines()
    assert table[0].split() == ["tensor", "shape", "dtype", "change"] and max(map(len, table)) <= 100
    assert (
        "Note: transformers builds `model.layers.*.mlp.experts.gate_up_proj` on load from per-expert tensors "
        "(experts.gate_up_proj → 4 experts × gate_proj, up_proj): each expert's slice of the LoRA delta is merged "
        "into the tensors the checkpoint stores, in their layout."
    ) in text.splitlines()


def test_a_conversion_loraship_cannot_invert_is_refused(tmp_path: Path) -> None:
    base = build_model(tmp_path / "base", QWEN3_MOE)
    adapter = build_adapter(base, tmp_path / "adapter", target_parameters=["mlp.experts.down_proj"])
    prepared = prepare_merge(base, adapter, scratch=tmp_path)
    assert prepared.model is not None
    param = "model.layers.0.mlp.experts.down_proj"
    other = replace(prepared.model.fused[param], refusal="Interleave(dim=1)")  # as transformers' inkling2 has
    model = replace(prepared.model, fused={**prepared.model.fused, param: other})
    with pytest.raises(UnsupportedError) as e:
        plan_merge(prepared.base, prepared.base_config, prepared.adapter, model=model)
    assert e.value.message == (
        "The adapter targets `model.layers.0.mlp.experts.down_proj`, which transformers builds on load from per-expert "
        "tensors with Interleave(dim=1): loraship cannot carry a LoRA delta back through that conversion."
    )
    assert e.value.fix == (
        "Merge this adapter with PEFT (PeftModel.from_pretrained(base, adapter).merge_and_unload(), then "
        "save_pretrained()), and check the result with `loraship verify`."
    )


def test_transformers_v4_mixtral_router_lora_merges_and_verify_says_peft_drops_it(tmp_path: Path) -> None:
    """A v4 Mixtral adapter with a LoRA on the router (``block_sparse_moe.gate``, an nn.Linear in v4) beside the
    per-expert LoRAs: transformers v5 loads the router as ``mlp.gate.weight``, and PEFT drops its LoRA on load.
    loraship merges it into the tensor it names; ``verify`` checks the weights and says why the outputs cannot be
    compared with PEFT."""
    base = build_model(tmp_path / "base", MIXTRAL)
    adapter = _v4_adapter(base, tmp_path / "adapter", "mixtral", rslora=False)
    tensors = load_tensors(adapter)
    g = torch.Generator().manual_seed(5)
    router = "base_model.model.model.layers.0.block_sparse_moe.gate"
    tensors[f"{router}.lora_A.weight"] = torch.randn(4, MIXTRAL["hidden_size"], generator=g)
    tensors[f"{router}.lora_B.weight"] = torch.randn(MIXTRAL["num_local_experts"], 4, generator=g)
    save_file(tensors, adapter / "adapter_model.safetensors")
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "target_modules": [*config["target_modules"],
                                                                                         "gate"]}))  # fmt: skip

    merge(base, adapter, tmp_path / "merged", progress=False)
    key = "model.layers.0.block_sparse_moe.gate.weight"
    w = load_tensors(base)[key]
    expected = w + (tensors[f"{router}.lora_B.weight"] @ tensors[f"{router}.lora_A.weight"]) * 2.0  # alpha 8 / r 4
    assert torch.equal(bits(load_tensors(tmp_path / "merged")[key]), bits(expected))

    report = verify(base, adapter, tmp_path / "merged", threshold_overrides={"generation_tokens": 4})
    assert report.passed, report.failed_checks
    assert report.weights.exact == report.weights.changed == 13
    outputs = [(c.name, c.passed, c.measured) for c in report.checks if c.level == "outputs"]
    assert outputs == [(
        "reference (PEFT, unmerged)", None,
        f"not valid: PEFT does not load `{router}.lora_A.weight` (nor 1 more adapter tensor(s)) from the adapter "
        "file as saved, so its unmerged model leaves that part of the adapter out",
    )]  # fmt: skip
