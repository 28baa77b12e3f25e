"""FourierFT against PEFT: each output tensor bit-identical to ``merge_and_unload()`` on CPU, on fp32, bf16 and fp16
bases (Linear layers and GPT-2's Conv1D; n_frequency_pattern, other seeds and scalings, a full spectrum, a bf16
adapter); the merged folder loaded with plain transformers behaves as PEFT's unmerged model; the places of the
spectrum really come from ``random_loc_seed``; and what loraship refuses.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import GPT2, LLAMA, assert_same_tensors, load_tensors, peft_reference
from methods.harness import DTYPES, check_behaves_like_peft, check_bit_identical, edit_config
from methods.harness import Case as MethodCase

from loraship.engine.merge import merge
from loraship.errors import AdapterError, IncompatibleError
from loraship.methods.base import Unsupported, method_of
from loraship.tiny import build_method_adapter

#: The tiny Llama's q_proj is 16 x 16, v_proj 8 x 16, up_proj 24 x 16, down_proj 16 x 24: PEFT's default
#: n_frequency (1000) is more than any has, so the cases choose theirs.
ATTN_MLP = ["q_proj", "v_proj", "up_proj", "down_proj"]


class Case(MethodCase):
    peft_type = "FOURIERFT"


CASES = [
    Case("fourierft-defaults", {"target_modules": ATTN_MLP, "n_frequency": 100}, LLAMA),  # seed 777, scaling 150
    Case("fourierft-full-spectrum", {"target_modules": ["q_proj", "o_proj"], "n_frequency": 256}, LLAMA),
    Case("fourierft-one-frequency", {"target_modules": ["v_proj"], "n_frequency": 1}, LLAMA),
    Case("fourierft-seed", {"target_modules": ATTN_MLP, "n_frequency": 60, "random_loc_seed": 20240613}, LLAMA),
    Case("fourierft-negative-seed", {"target_modules": ["q_proj"], "n_frequency": 60, "random_loc_seed": -3}, LLAMA),
    Case(
        "fourierft-n-frequency-pattern",
        {
            "target_modules": ATTN_MLP,
            "n_frequency": 50,
            # a suffix, a regular expression, and a full module name (PEFT's fallback: the name as a key)
            "n_frequency_pattern": {"v_proj": 30, r"layers\.0\.mlp\..*": 200, "model.layers.1.mlp.down_proj": 384},
        },
        LLAMA,
    ),
    Case("fourierft-scaling", {"target_modules": ATTN_MLP, "n_frequency": 80, "scaling": 12.3}, LLAMA),
    Case("fourierft-gpt2", {"target_modules": ["c_attn", "c_fc"], "n_frequency": 200}, GPT2),
    Case(
        "fourierft-adapter-bf16",
        {"target_modules": ["q_proj", "o_proj"], "n_frequency": 64},
        LLAMA,
        adapter_dtype="bfloat16",
    ),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bit_identical_to_peft(case: Case, dtype: str, model_cache, tmp_path: Path) -> None:
    check_bit_identical(case, dtype, model_cache, tmp_path)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_merged_folder_behaves_like_base_plus_adapter(case: Case, model_cache, tmp_path: Path) -> None:
    check_behaves_like_peft(case, model_cache, tmp_path)


def test_the_seed_places_the_spectrum(model_cache, tmp_path: Path) -> None:
    """The places are not saved: another random_loc_seed in the config (edited after saving) moves every
    frequency, so the merge differs from the correct one, and is PEFT's for the edited config."""
    base = model_cache(LLAMA)
    adapter = build_method_adapter(base, tmp_path / "adapter", "FOURIERFT", target_modules=["q_proj"], n_frequency=40)
    edited = tmp_path / "edited"
    shutil.copytree(adapter, edited)
    edit_config(edited, random_loc_seed=778)
    merge(base, adapter, tmp_path / "merged", progress=False)
    merge(base, edited, tmp_path / "merged-edited", progress=False)
    right, wrong = load_tensors(tmp_path / "merged"), load_tensors(tmp_path / "merged-edited")
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(right[name], wrong[name])
    assert_same_tensors(wrong, peft_reference(base, edited, tmp_path / "peft-edited", dtype=torch.float32))


def test_verify_fails_a_merge_of_another_seed(model_cache, tmp_path: Path) -> None:
    """The plan cannot see an edited seed (the tensors fit either way); verify, recomputing the weights and running
    PEFT's unmerged model on the adapter as it now is, fails a folder merged before the edit."""
    from loraship.check.verify import verify

    base = model_cache(LLAMA)
    adapter = build_method_adapter(base, tmp_path / "adapter", "FOURIERFT", target_modules=["q_proj", "down_proj"],
                                   n_frequency=100)  # fmt: skip
    merge(base, adapter, tmp_path / "merged", progress=False)
    report = verify(base, adapter, tmp_path / "merged", threshold_overrides={"generation_tokens": 4})
    assert report.passed, report.failed_checks
    assert report.weights.exact == report.weights.changed == 4  # two layers
    edit_config(adapter, random_loc_seed=1)
    edited = verify(base, adapter, tmp_path / "merged", threshold_overrides={"generation_tokens": 4})
    failed = {f"{c.level}: {c.name}" for c in edited.checks if c.passed is False}
    assert {"weights: changed tensors recomputed", "outputs: merge error / adapter effect"} <= failed


def test_plan_and_card_words(model_cache, tmp_path: Path) -> None:
    base = model_cache(LLAMA)
    adapter = build_method_adapter(
        base, tmp_path / "adapter", "FOURIERFT", target_modules=["q_proj", "down_proj"], n_frequency=100,
        n_frequency_pattern={"down_proj": 300},
    )  # fmt: skip
    result = merge(base, adapter, tmp_path / "merged", progress=False)
    modules = result.prepared.adapter.method_modules
    method = method_of("FOURIERFT")
    assert method is not None and method.kind == "additive"
    assert {method.describe(m) for m in modules} == {
        "FourierFT 100 frequencies, scaling 150",
        "FourierFT 300 frequencies, scaling 150",
    }
    assert method.summary(modules) == "n_frequency = 100–300, scaling = 150, random_loc_seed = 777"


def test_refuses_a_base_with_fewer_places_than_frequencies(model_cache, tmp_path: Path) -> None:
    base = model_cache(LLAMA)
    adapter = build_method_adapter(base, tmp_path / "adapter", "FOURIERFT", target_modules=["q_proj"], n_frequency=100)
    narrower = model_cache({**LLAMA, "hidden_size": 8})
    with pytest.raises(
        IncompatibleError,
        match=r"Shape mismatch for `model\.layers\.0\.self_attn\.q_proj\.weight`: the base tensor is \[8, 8\], but "
        r"the adapter's fourierft_spectrum has 100 frequencies, more than the 8 x 8 = 64 places of a weight of 8 "
        r"outputs and 8 inputs\.",
    ):
        merge(narrower, adapter, tmp_path / "merged", progress=False)


def test_merges_onto_a_wider_base_as_peft_does(model_cache, tmp_path: Path) -> None:
    """The spectrum fits any layer with at least n places: PEFT loads it onto a wider base, and so does loraship."""
    base = model_cache(LLAMA)
    adapter = build_method_adapter(base, tmp_path / "adapter", "FOURIERFT", target_modules=["q_proj"], n_frequency=100)
    wider = model_cache({**LLAMA, "hidden_size": 32})
    merge(wider, adapter, tmp_path / "merged", progress=False)
    reference = peft_reference(wider, adapter, tmp_path / "peft", dtype=torch.float32)
    assert_same_tensors(load_tensors(tmp_path / "merged"), reference)


@pytest.mark.parametrize(
    ("changes", "phrase"),
    [
        ({"n_frequency": 90}, r"fourierft_spectrum has 100 frequencies, but its n_frequency = 90 makes PEFT build"),
        (
            {"n_frequency_pattern": {"q_proj": 120}},
            r"fourierft_spectrum has 100 frequencies, but its n_frequency_pattern\['q_proj'\] = 120 makes PEFT",
        ),
    ],
)
def test_refuses_a_spectrum_the_config_does_not_make(
    changes: dict[str, Any], phrase: str, model_cache, tmp_path: Path
) -> None:
    base = model_cache(LLAMA)
    adapter = build_method_adapter(base, tmp_path / "adapter", "FOURIERFT", target_modules=["q_proj"], n_frequency=100)
    edit_config(adapter, **changes)
    with pytest.raises(IncompatibleError, match=phrase):
        merge(base, adapter, tmp_path / "merged", progress=False)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"random_loc_seed": "777"}, r"sets `random_loc_seed` to \"777\", but PEFT expects a whole number"),
        ({"random_loc_seed": 2**64}, r"sets `random_loc_seed` to 18446744073709551616, but PEFT expects"),
        ({"n_frequency": 0}, r"sets `n_frequency` to 0, but PEFT expects a whole number from 1"),
        ({"scaling": True}, r"sets `scaling` to true, but PEFT expects a number"),
        ({"n_frequency_pattern": {"q_proj": 1.5}}, r"sets `n_frequency_pattern` to \{\"q_proj\": 1\.5\}"),
        ({"random_loc_seed": None}, r"sets `random_loc_seed` to null, but PEFT's FourierFTConfig needs a number"),
        ({"n_frequency_pattern": {"(q_proj": 100}}, r"the `n_frequency_pattern` key `\(q_proj` is not a valid regular"),
    ],
)
def test_refuses_a_config_peft_cannot_merge(changes: dict[str, Any], message: str, model_cache, tmp_path: Path) -> None:
    base = model_cache(LLAMA)
    adapter = build_method_adapter(base, tmp_path / "adapter", "FOURIERFT", target_modules=["q_proj"], n_frequency=100)
    edit_config(adapter, **changes)
    with pytest.raises(AdapterError, match=message):
        merge(base, adapter, tmp_path / "merged", progress=False)


def test_shape_problems_in_words() -> None:
    method = method_of("FOURIERFT")
    assert method is not None

    @dataclass(frozen=True)
    class Info:
        name: str
        shape: tuple[int, ...]

    m = method.module("h.0.attn.c_attn", {"fourierft_spectrum": Info("x", (768,))}, {"n_frequency": 768}, Path("a"))
    assert method.shape_problem(m, "weight", (16, 48), True) is None  # Conv1D: (in, out)
    assert method.shape_problem(m, "weight", (48, 16), False) is None
    assert "768 frequencies, more than the 48 x 8 = 384" in (method.shape_problem(m, "weight", (8, 48), True) or "")
    conv = method.shape_problem(m, "weight", (48, 16, 1, 1), False)
    assert isinstance(conv, Unsupported) and "4-D weight is not merged" in conv
    with pytest.raises(AdapterError, match=r"has fourierft_spectrum \[2, 3\], but PEFT saves it as one row"):
        method.module("q", {"fourierft_spectrum": Info("x", (2, 3))}, {}, Path("a"))
    with pytest.raises(AdapterError, match=r"has only something"):
        method.module("q", {"something": Info("x", (3,))}, {}, Path("a"))
