"""SHiRA against PEFT: each output tensor bit-identical to ``merge_and_unload()`` on CPU, on fp32, bf16 and fp16
bases (PEFT's default random mask, with and without a seed, other ``r``, attention biases left alone, a bf16
adapter); the merged folder loaded with plain transformers behaves as PEFT's unmerged model; ``verify``; and what
loraship refuses.

Every merge is checked against PEFT's own SHiRA layers built on the meta device (where ``torch.where`` of the mask
cannot run, the check gives each layer ``r x (in + out)`` meta places, only while it builds): the tests run that
check as merges do.
"""

from __future__ import annotations

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
from loraship.errors import IncompatibleError
from loraship.methods.base import method_of
from loraship.tiny import build_method_adapter

ATTN_MLP = ["q_proj", "v_proj", "up_proj", "down_proj"]


def test_plan_check_builds_peft_shira_layers_on_meta(model_cache, tmp_path: Path) -> None:
    """The check against PEFT's layers on the meta device builds SHiRA's (no mask to take places from there) and
    places every adapter tensor; PEFT's own ``update_layer`` is left as it was."""
    import peft.tuners.shira.layer as layer

    own = layer.ShiraLayer.update_layer
    base = model_cache(LLAMA)
    adapter = build_method_adapter(base, tmp_path / "adapter", "SHIRA", target_modules=ATTN_MLP, r=2)
    result = merge(base, adapter, tmp_path / "merged", progress=False)
    names = result.prepared.names
    assert names is not None and names.skipped is None and names.agrees
    assert names.checked == len(result.prepared.adapter.tensors) > 0
    assert layer.ShiraLayer.update_layer is own


@dataclass(frozen=True)
class Case:
    id: str
    settings: dict[str, Any]
    config: dict[str, Any]
    adapter_dtype: str | None = None


CASES = [
    Case("shira", {"target_modules": ATTN_MLP, "r": 1}, LLAMA),
    Case("shira-seeded-r-2", {"target_modules": ATTN_MLP, "r": 2, "random_seed": 7, "init_weights": False}, LLAMA),
    Case("shira-bias", {"target_modules": ["q_proj", "k_proj", "o_proj"], "r": 1}, QWEN2),
    Case("shira-adapter-bf16", {"target_modules": ["q_proj", "o_proj"], "r": 1}, LLAMA, adapter_dtype="bfloat16"),
]
DTYPES = ["float32", "bfloat16", "float16"]


def _inputs() -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(0, 30, (1, 9), generator=torch.Generator().manual_seed(0))}


def _adapter(case: Case, base: Path, folder: Path) -> Path:
    return build_method_adapter(base, folder, "SHIRA", adapter_dtype=case.adapter_dtype, **case.settings)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bit_identical_to_peft(case: Case, dtype: str, model_cache, tmp_path: Path) -> None:
    base = model_cache(case.config, dtype=dtype)
    adapter = _adapter(case, base, tmp_path / "adapter")
    result = merge(base, adapter, tmp_path / "merged", progress=False)
    reference = peft_reference(base, adapter, tmp_path / "peft", dtype=getattr(torch, dtype))
    ours = load_tensors(tmp_path / "merged")
    untouched = frozenset(t.name for t in result.prepared.plan.tensors if not t.changed)
    assert_same_tensors(ours, reference, upcast_ok=untouched)
    assert_changes_as_planned(result.prepared.plan, ours, base)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_merged_folder_behaves_like_base_plus_adapter(case: Case, model_cache, tmp_path: Path) -> None:
    base = model_cache(case.config, dtype="float32")
    adapter = _adapter(case, base, tmp_path / "adapter")
    merge(base, adapter, tmp_path / "merged", progress=False)
    expected = peft_outputs(base, adapter, _inputs())
    torch.testing.assert_close(plain_outputs(tmp_path / "merged", _inputs()), expected, rtol=1e-4, atol=1e-4)


def test_verify_passes_a_correct_merge_and_fails_a_doubled_one(model_cache, tmp_path: Path) -> None:
    from loraship.check.verify import verify

    base = model_cache(LLAMA)
    adapter = _adapter(CASES[0], base, tmp_path / "adapter")
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
    adapter = build_method_adapter(base, tmp_path / "adapter", "SHIRA", target_modules=["q_proj"], r=2)
    result = merge(base, adapter, tmp_path / "merged", progress=False)
    modules = result.prepared.adapter.method_modules
    method = method_of("SHIRA")
    assert method is not None and method.kind == "additive"
    assert {method.describe(m) for m in modules} == {"SHiRA 64 sparse values (r=2)"}
    assert method.summary(modules) == "r = 2"


def test_refuses_a_base_of_other_width(model_cache, tmp_path: Path) -> None:
    base = model_cache(LLAMA)
    adapter = build_method_adapter(base, tmp_path / "adapter", "SHIRA", target_modules=["q_proj"], r=1)
    wider = model_cache({**LLAMA, "hidden_size": 32})
    with pytest.raises(IncompatibleError) as e:
        merge(wider, adapter, tmp_path / "merged", progress=False)
    assert e.value.message == (
        "Shape mismatch for `model.layers.0.self_attn.q_proj.weight`: the base tensor is [32, 32], but the adapter's "
        "shira_weight has 32 values, not the r x (in + out) = 1 x (32 + 32) = 64 PEFT makes."
    )


def test_shape_problems_in_words() -> None:
    """What PEFT's SHiRA does not adapt or refuses to build."""
    method = method_of("SHIRA")
    assert method is not None

    @dataclass(frozen=True)
    class Info:
        name: str
        shape: tuple[int, ...]

    m = method.module("q", {"shira_indices": Info("i", (2, 24)), "shira_weight": Info("w", (24,))}, {"r": 2},
                      Path("a"))  # fmt: skip
    assert method.shape_problem(m, "weight", (8, 4), False) is None
    assert method.shape_problem(m, "weight", (3, 3), False) == (
        "PEFT's SHiRA refuses r = 2 there: r x (in + out) = 12 values, more than the weight's 9"
    )
    assert method.shape_problem(m, "weight", (4, 8), True) == (
        "SHiRA on a Conv1D layer (weights stored (in, out)) is not merged (PEFT's SHiRA adapts only Linear layers)"
    )
    assert method.shape_problem(m, "weight", (8, 4, 1, 1), False) == (
        "SHiRA on a 4-D weight is not merged (PEFT's SHiRA adapts only Linear layers)"
    )
