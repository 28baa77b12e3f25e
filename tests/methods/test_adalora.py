"""AdaLoRA against PEFT itself: each output tensor bit-identical to
``PeftModel.from_pretrained(base, adapter).merge_and_unload().save_pretrained()`` on CPU, on fp32, bf16
and fp16 bases, before and after budget allocation (a ``rank_pattern`` of boolean masks, modules cut to
fewer ranks and one to none, saved as PEFT's ``save_pretrained`` does); the merged folder loaded with plain
transformers behaves as PEFT's unmerged model; and adapters PEFT would refuse are refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import GPT2, LLAMA, RESNET, assert_changes_as_planned, assert_same_tensors, load_tensors, peft_reference
from methods.harness import DTYPES, check_behaves_like_peft, check_bit_identical, edit_config
from methods.harness import Case as MethodCase

from loraship.engine.merge import merge
from loraship.errors import AdapterError

ATTN_MLP = ["q_proj", "v_proj", "up_proj", "down_proj"]
#: Budget allocation from init_r 4 to an average of 2 (tinit = tfinal = 0: every step allocates).
SCHEDULE = {"init_r": 4, "target_r": 2, "total_step": 10, "tinit": 0, "tfinal": 0, "deltaT": 1}


@dataclass(frozen=True)
class Case(MethodCase):
    peft_type = "ADALORA"

    allocate: bool = False  # the adapter after PEFT's own budget allocation

    def adapter(self, base: Path, folder: Path, **override: Any) -> Path:
        if self.allocate:
            settings = {**self.settings, **override}
            return _allocated_adapter(
                base, folder, model_class=self.model_class, adapter_dtype=self.adapter_dtype, **settings
            )
        return super().adapter(base, folder, **override)


CASES = [
    Case("adalora", {"target_modules": ATTN_MLP, "init_r": 4, "lora_alpha": 8, "total_step": 10}, LLAMA),
    Case(  # ranknum = float(init_r) passes through the base's dtype: 257 is 256 in bf16
        "adalora-init-r-257", {"target_modules": ["q_proj"], "init_r": 257, "lora_alpha": 8, "total_step": 10}, LLAMA
    ),
    Case("adalora-allocated", {"target_modules": ATTN_MLP, "lora_alpha": 8, **SCHEDULE}, LLAMA, allocate=True),
    Case(  # lora_alpha 0: the scaling is float(r), with r the kept rank of each module the pattern resized
        "adalora-allocated-alpha-0", {"target_modules": ATTN_MLP, "lora_alpha": 0, **SCHEDULE}, LLAMA, allocate=True
    ),
    Case(  # GPT-2's Conv1D stores weights (in, out): PEFT transposes the delta
        "adalora-conv1d-gpt2",
        {"target_modules": ["c_attn"], "fan_in_fan_out": True, "lora_alpha": 8, **SCHEDULE},
        GPT2,
        allocate=True,
    ),
    Case(
        "adalora-adapter-bf16",
        {"target_modules": ["q_proj", "o_proj", "down_proj"], "lora_alpha": 16, **SCHEDULE},
        LLAMA,
        allocate=True,
        adapter_dtype="bfloat16",
    ),
    Case(
        "adalora-conv2d",
        {"target_modules": ["convolution"], "lora_alpha": 4, **SCHEDULE},
        RESNET,
        allocate=True,
        model_class="AutoModelForImageClassification",
        inputs="pixels",
    ),
]
PLAIN = next(c for c in CASES if c.id == "adalora")
ALLOCATED = next(c for c in CASES if c.id == "adalora-allocated")


def _allocated_adapter(
    base: Path, folder: Path, *, model_class: str, adapter_dtype: str | None, seed: int = 1, **settings: Any
) -> Path:
    """An AdaLoRA adapter after PEFT's own budget allocation (``update_and_allocate`` every step, with
    random gradients and updates standing in for training), saved with ``save_pretrained``: the config
    gets the rank_pattern masks and the tensors only the ranks kept."""
    import transformers
    from peft import AdaLoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = getattr(transformers, model_class).from_pretrained(str(base), dtype=torch.float32)
    peft_model = get_peft_model(model, AdaLoraConfig(**settings))
    trained = [p for p in peft_model.parameters() if p.requires_grad]
    for step in range(settings["total_step"] + 1):  # backward, optimizer step, then the allocation (it masks E)
        for p in trained:
            p.grad = torch.randn_like(p)
            with torch.no_grad():
                p.add_(torch.randn_like(p) * 0.1)
        peft_model.base_model.update_and_allocate(step)
    if adapter_dtype:
        peft_model = peft_model.to(getattr(torch, adapter_dtype))
    peft_model.save_pretrained(str(folder))
    return folder


def _kept(adapter: Path) -> dict[str, int]:
    """Module -> rank kept, from the saved config's masks."""
    pattern = json.loads((adapter / "adapter_config.json").read_text())["rank_pattern"] or {}
    return {key.removesuffix(".lora_E"): sum(mask) for key, mask in pattern.items()}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bit_identical_to_peft(case: Case, dtype: str, model_cache, tmp_path: Path) -> None:
    base, adapter, result, ours = check_bit_identical(
        case, dtype, model_cache, tmp_path, upcast_ok=None, as_planned=False
    )
    kept = _kept(adapter)
    if case.allocate:  # the allocation really cut ranks (and the test covers a cut module)
        assert kept and any(r < SCHEDULE["init_r"] for r in kept.values())
    # A module that keeps no rank adds PEFT's zero delta: planned, but its bits stay the base's.
    empty = {f"{m}.weight" for m, r in kept.items() if r == 0}
    base_tensors = load_tensors(base)
    for name in empty:
        assert torch.equal(ours[name], base_tensors[name])
    if empty:
        changed = {n for n, t in ours.items() if not torch.equal(t, base_tensors[n])}
        assert changed == {t.name for t in result.prepared.plan.changed} - empty
        assert changed
    else:
        assert_changes_as_planned(result.prepared.plan, ours, base)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_merged_folder_behaves_like_base_plus_adapter(case: Case, model_cache, tmp_path: Path) -> None:
    check_behaves_like_peft(case, model_cache, tmp_path)


def test_allocation_cuts_some_modules_to_none_and_some_partly(model_cache, tmp_path: Path) -> None:
    """The allocated LLaMA adapter the cases use covers every kind of module: none, some and all ranks kept."""
    base = model_cache(LLAMA)
    adapter = ALLOCATED.adapter(base, tmp_path / "adapter")
    kept = sorted(_kept(adapter).values())
    assert 0 in kept and any(0 < r < 4 for r in kept) and 4 in kept
    saved = load_tensors(adapter)
    zero = next(m for m, r in _kept(adapter).items() if r == 0)
    assert saved[f"base_model.model.{zero}.lora_A"].shape == (0, LLAMA["hidden_size"])


def test_negative_zero_in_a_module_that_keeps_no_rank_becomes_zero_as_in_peft(model_cache, tmp_path: Path) -> None:
    """PEFT adds an all-zero delta to a module cut to rank 0: -0.0 + 0.0 is +0.0, and so it is here."""
    from safetensors.torch import save_file

    from loraship.tiny import build_model

    base = model_cache(LLAMA)
    adapter = ALLOCATED.adapter(base, tmp_path / "adapter")
    zero = next(m for m, r in _kept(adapter).items() if r == 0)
    signed = tmp_path / "signed"
    build_model(signed, LLAMA, dtype="bfloat16")
    tensors = load_tensors(signed)
    tensors[f"{zero}.weight"][0, :3] = -0.0
    (path,) = signed.glob("*.safetensors")
    save_file(tensors, str(path), metadata={"format": "pt"})
    merge(signed, adapter, tmp_path / "merged", progress=False)
    reference = peft_reference(signed, adapter, tmp_path / "peft", dtype=torch.bfloat16)
    ours = load_tensors(tmp_path / "merged")
    assert_same_tensors(ours, reference)
    assert not torch.signbit(ours[f"{zero}.weight"][0, :3]).any()


def test_verify_passes_a_correct_merge(model_cache, tmp_path: Path) -> None:
    from loraship.check.verify import verify

    base = model_cache(LLAMA)
    adapter = ALLOCATED.adapter(base, tmp_path / "adapter")
    merge(base, adapter, tmp_path / "merged", progress=False)
    report = verify(base, adapter, tmp_path / "merged", threshold_overrides={"generation_tokens": 4})
    assert report.passed, report.failed_checks
    assert report.weights.exact == report.weights.changed > 0


def test_plan_describes_kept_and_initial_rank(model_cache, tmp_path: Path) -> None:
    from loraship.engine.merge import prepare_merge
    from loraship.methods.adalora import METHOD

    base = model_cache(LLAMA)
    adapter = ALLOCATED.adapter(base, tmp_path / "adapter")
    modules = prepare_merge(base, adapter, scratch=tmp_path / "scratch").plan.adapter.method_modules
    kept = _kept(adapter)
    for m in modules:
        r = kept[m.module]
        assert METHOD.describe(m) == (f"AdaLoRA r={r} of 4 scale=8/4" if r else "AdaLoRA r=0 of 4 (no change)")
    assert METHOD.summary(modules) == "init_r = 4, rank kept = 0–4, lora_alpha = 8"


# --------------------------------------------------------------------------- refused


def _refused(base: Path, adapter: Path, out: Path, match: str) -> None:
    with pytest.raises(AdapterError, match=match):
        merge(base, adapter, out, progress=False)


def test_rank_pattern_of_ranks_is_refused(model_cache, tmp_path: Path) -> None:
    """LoRA's rank_pattern holds ranks; AdaLoRA's holds masks (PEFT raises TypeError on ints)."""
    base = model_cache(LLAMA)
    adapter = ALLOCATED.adapter(base, tmp_path / "adapter")
    edit_config(adapter, rank_pattern={k: sum(v) for k, v in json.loads(
        (adapter / "adapter_config.json").read_text())["rank_pattern"].items()})  # fmt: skip
    _refused(base, adapter, tmp_path / "merged", "lists of true/false")


def test_mask_that_does_not_fit_the_tensors_is_refused(model_cache, tmp_path: Path) -> None:
    base = model_cache(LLAMA)
    adapter = ALLOCATED.adapter(base, tmp_path / "adapter")
    pattern = json.loads((adapter / "adapter_config.json").read_text())["rank_pattern"]
    key = next(k for k, v in pattern.items() if 0 < sum(v) < 4)
    pattern[key] = [True] * 4
    edit_config(adapter, rank_pattern=pattern)
    _refused(base, adapter, tmp_path / "merged", "rank_pattern keeps 4 of 4 ranks")


def test_cut_tensors_without_their_rank_pattern_are_refused(model_cache, tmp_path: Path) -> None:
    base = model_cache(LLAMA)
    adapter = ALLOCATED.adapter(base, tmp_path / "adapter")
    edit_config(adapter, rank_pattern=None)
    _refused(base, adapter, tmp_path / "merged", "rank_pattern does not name it")


def test_rank_pattern_naming_no_layer_is_refused(model_cache, tmp_path: Path) -> None:
    base = model_cache(LLAMA)
    adapter = PLAIN.adapter(base, tmp_path / "adapter")
    edit_config(adapter, rank_pattern={"model.layers.0.self_attn.k_proj.lora_E": [True, False, True, True]})
    _refused(base, adapter, tmp_path / "merged", "rank_pattern names")
