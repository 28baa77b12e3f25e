"""PEANuT against PEFT: each output tensor bit-identical to ``merge_and_unload()`` on CPU, on fp32, bf16 and fp16
bases (depth 0 and deeper, several activations, scaling, a bf16 adapter); the merged folder loaded with plain
transformers behaves as PEFT's unmerged model; ``verify`` passes the merge and fails a doubled one; and what loraship
refuses.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import (
    LLAMA,
    QWEN2,
    assert_changes_as_planned,
    assert_same_tensors,
    load_tensors,
    peft_outputs,
    peft_reference,
    plain_outputs,
)

from loraship.engine.merge import merge
from loraship.errors import IncompatibleError, UnsupportedError
from loraship.methods.base import method_of
from loraship.tiny import build_method_adapter

ATTN_MLP = ["q_proj", "k_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class Case:
    id: str
    settings: dict[str, Any]
    config: dict[str, Any]
    model_class: str = "AutoModelForCausalLM"
    adapter_dtype: str | None = None
    inputs: str = "tokens"


CASES = [
    Case("peanut", {"target_modules": ATTN_MLP, "r": 4}, LLAMA),
    Case("peanut-depth-2", {"target_modules": ATTN_MLP, "r": 4, "depth": 2, "scaling": 0.5}, LLAMA),
    Case("peanut-gelu", {"target_modules": ATTN_MLP, "r": 3, "depth": 1, "act_fn": "gelu"}, LLAMA),
    Case("peanut-silu", {"target_modules": ATTN_MLP, "r": 2, "depth": 3, "act_fn": "silu", "scaling": 2.0}, LLAMA),
    Case("peanut-tanh", {"target_modules": ATTN_MLP, "r": 2, "depth": 1, "act_fn": "tanh"}, LLAMA),
    Case("peanut-gelu-new", {"target_modules": ATTN_MLP, "r": 2, "depth": 1, "act_fn": "gelu_new"}, LLAMA),
    Case("peanut-gelu-tanh", {"target_modules": ["o_proj"], "r": 2, "depth": 1, "act_fn": "gelu_pytorch_tanh"}, LLAMA),
    Case("peanut-quick-gelu", {"target_modules": ["o_proj"], "r": 2, "act_fn": "quick_gelu"}, LLAMA),
    Case("peanut-leaky-relu", {"target_modules": ["o_proj"], "r": 2, "depth": 1, "act_fn": "leaky_relu"}, LLAMA),
    Case("peanut-adapter-bf16", {"target_modules": ["q_proj", "o_proj"], "r": 2, "depth": 1}, LLAMA,
         adapter_dtype="bfloat16"),
    Case("peanut-bias", {"target_modules": ["q_proj", "v_proj"], "r": 2, "depth": 1}, QWEN2),
]  # fmt: skip
DTYPES = ["float32", "bfloat16", "float16"]


def _inputs(kind: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    if kind == "pixels":
        return {"pixel_values": torch.randn(1, 3, 16, 16, generator=g)}
    if kind == "audio":
        return {"input_values": torch.randn(1, 64, generator=g)}
    return {"input_ids": torch.randint(0, 30, (1, 9), generator=g)}


def _adapter(case: Case, base: Path, folder: Path) -> Path:
    return build_method_adapter(
        base, folder, "PEANUT", model_class=case.model_class, adapter_dtype=case.adapter_dtype, **case.settings
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
    assert_same_tensors(ours, reference, upcast_ok=untouched)
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


def test_verify_passes_a_correct_merge_and_fails_a_doubled_one(model_cache, tmp_path: Path) -> None:
    from loraship.check.verify import verify

    case = CASES[0]
    base = model_cache(case.config)
    adapter = _adapter(case, base, tmp_path / "adapter")
    merge(base, adapter, tmp_path / "merged", progress=False)
    report = verify(base, adapter, tmp_path / "merged", threshold_overrides={"generation_tokens": 4})
    assert report.passed, report.failed_checks
    assert report.weights.exact == report.weights.changed > 0
    merge(tmp_path / "merged", adapter, tmp_path / "twice", progress=False)
    twice = verify(base, adapter, tmp_path / "twice", threshold_overrides={"generation_tokens": 4})
    failed = {f"{c.level}: {c.name}" for c in twice.checks if c.passed is False}
    assert {"weights: changed tensors recomputed", "outputs: merge error / adapter effect"} <= failed


def test_plan_and_card_words(model_cache, tmp_path: Path) -> None:
    base = model_cache(LLAMA)
    adapter = build_method_adapter(base, tmp_path / "adapter", "PEANUT", target_modules=["q_proj"], r=4, depth=2,
                                   act_fn="gelu", scaling=0.5)  # fmt: skip
    result = merge(base, adapter, tmp_path / "merged", progress=False)
    modules = result.prepared.adapter.method_modules
    method = method_of("PEANUT")
    assert method is not None and method.kind == "multiplicative"
    assert {method.describe(m) for m in modules} == {"PEANuT r=4 depth=2 gelu x0.5"}
    assert method.summary(modules) == "r = 4, depth = 2, gelu, scaling = 0.5"


def test_refuses_an_activation_it_does_not_reproduce(model_cache, tmp_path: Path) -> None:
    base = model_cache(LLAMA)
    adapter = build_method_adapter(base, tmp_path / "adapter", "PEANUT", target_modules=["q_proj"], r=2, act_fn="mish")
    with pytest.raises(UnsupportedError) as e:
        merge(base, adapter, tmp_path / "merged", progress=False)
    assert (e.value.message, e.value.fix) == (
        f"`{adapter}` is a PEANuT adapter with act_fn = 'mish', an activation loraship does not reproduce (it merges "
        "PEANuT with relu, gelu, gelu_new, gelu_fast, gelu_pytorch_tanh, quick_gelu, silu, swish, tanh, sigmoid, "
        "leaky_relu, linear).",
        "Merge it with PEFT itself: PeftModel.from_pretrained(base, adapter).merge_and_unload(), then check the "
        "result with `loraship verify`.",
    )
    assert not (tmp_path / "merged").exists()


def test_refuses_a_base_of_other_width(model_cache, tmp_path: Path) -> None:
    base = model_cache(LLAMA)
    adapter = build_method_adapter(base, tmp_path / "adapter", "PEANUT", target_modules=["q_proj"], r=2)
    wider = model_cache({**LLAMA, "hidden_size": 32})
    with pytest.raises(IncompatibleError, match=r"the adapter's peanut_A \[2, 16\] needs a layer with 16 output"):
        merge(wider, adapter, tmp_path / "merged", progress=False)


def test_refuses_tensors_that_do_not_match_the_depth(model_cache, tmp_path: Path) -> None:
    from loraship.errors import AdapterError

    base = model_cache(LLAMA)
    adapter = build_method_adapter(base, tmp_path / "adapter", "PEANUT", target_modules=["q_proj"], r=2, depth=1)
    path = adapter / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "depth": 2}))
    with pytest.raises(AdapterError, match=r"the PEANuT \(depth 2\) module `model\.layers\.0\.self_attn\.q_proj` has "
                       r"only peanut_A\.weight, peanut_B\.weight, peanut_decoders\.0\.weight"):  # fmt: skip
        merge(base, adapter, tmp_path / "merged", progress=False)
