"""SHiRA against PEFT: each output tensor bit-identical to ``merge_and_unload()`` on CPU, on fp32, bf16 and fp16
bases (PEFT's default random mask, with and without a seed, other ``r``, attention biases left alone, a bf16
adapter); the merged folder loaded with plain transformers behaves as PEFT's unmerged model; ``verify``; and what
loraship refuses.

loraship does not register SHiRA yet: its check of every plan against PEFT's layers on the meta device cannot build
PEFT's SHiRA layers there (``torch.where`` of the mask). Every test but the one of that refusal registers it, with
the change that check needs stood in for (:func:`_plan_check_builds_shira`: on the meta device, a mask of the right
count built on the CPU; the positions do not matter there, only the shapes; off it nothing changes).
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
from loraship.errors import IncompatibleError, UnsupportedError
from loraship.methods.base import method_of, registry
from loraship.tiny import build_method_adapter

ATTN_MLP = ["q_proj", "v_proj", "up_proj", "down_proj"]


@pytest.fixture(autouse=True)
def _plan_check_builds_shira(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    if request.function.__name__ == "test_refused_until_the_plan_check_builds_shira":
        return
    import peft.tuners.shira.layer as layer

    from loraship.methods import shira

    update_layer = layer.ShiraLayer.update_layer

    def meta_safe(self: Any, adapter_name: str, mask: Any, r: int, *args: Any, **kwargs: Any) -> Any:
        if mask is None or mask.device.type != "meta":
            return update_layer(self, adapter_name, mask, r, *args, **kwargs)
        with torch.device("cpu"):
            cpu_mask = torch.zeros(mask.shape)
            cpu_mask.view(-1)[: r * (self.in_features + self.out_features)] = 1.0
            return update_layer(self, adapter_name, cpu_mask, r, *args, **kwargs)

    monkeypatch.setattr(layer.ShiraLayer, "update_layer", meta_safe)
    monkeypatch.setattr(shira, "PLAN_CHECK_BUILDS_SHIRA", True)
    monkeypatch.setitem(registry(), "SHIRA", shira.SHiRA())


def test_refused_until_the_plan_check_builds_shira(model_cache, tmp_path: Path) -> None:
    base = model_cache(LLAMA)
    adapter = build_method_adapter(base, tmp_path / "adapter", "SHIRA", target_modules=["q_proj"], r=1)
    assert method_of("SHIRA") is None
    with pytest.raises(UnsupportedError) as e:
        merge(base, adapter, tmp_path / "merged", progress=False)
    assert e.value.message.startswith(
        f"`{adapter / 'adapter_config.json'}` is a SHIRA adapter: a method PEFT can merge, but loraship does not "
        "merge yet (it merges "
    )
    assert not (tmp_path / "merged").exists()


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
