"""WaveFT against PEFT: each output tensor bit-identical to ``merge_and_unload()`` on CPU, on fp32, bf16 and fp16
bases (wavelet families of every kind PEFT has filters for, without the IDWT, proportional_parameters,
n_frequency_pattern, GPT-2's Conv1D, a bf16 adapter); the merged folder loaded with plain transformers behaves as
PEFT's unmerged model; verify passes a correct merge and fails a doubled one; and what loraship refuses.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import GPT2, LLAMA
from methods.harness import (
    DTYPES,
    check_behaves_like_peft,
    check_bit_identical,
    check_verify_catches_double_merge,
    edit_config,
)
from methods.harness import Case as MethodCase

from loraship.engine.merge import merge
from loraship.errors import IncompatibleError, UnsupportedError
from loraship.methods.base import Unsupported, method_of
from loraship.tiny import build_method_adapter

ATTN_MLP = ["q_proj", "v_proj", "up_proj", "down_proj"]


class Case(MethodCase):
    peft_type = "WAVEFT"


CASES = [
    Case("waveft-db1", {"target_modules": ATTN_MLP, "n_frequency": 60}, LLAMA),
    Case("waveft-db4", {"target_modules": ATTN_MLP, "n_frequency": 50, "wavelet_family": "db4"}, LLAMA),
    Case(
        "waveft-sym5-seed",
        {"target_modules": ATTN_MLP, "n_frequency": 40, "wavelet_family": "sym5", "random_loc_seed": 3},
        LLAMA,
    ),
    Case(
        "waveft-coif2-scaling",
        {"target_modules": ATTN_MLP, "n_frequency": 70, "wavelet_family": "coif2", "scaling": 3.5},
        LLAMA,
    ),
    Case("waveft-no-idwt", {"target_modules": ATTN_MLP, "n_frequency": 30, "use_idwt": False}, LLAMA),
    Case(
        "waveft-proportional",
        {"target_modules": ATTN_MLP, "n_frequency": 30, "proportional_parameters": True, "wavelet_family": "db3"},
        LLAMA,
    ),
    Case(
        "waveft-pattern",
        {
            "target_modules": ATTN_MLP,
            "n_frequency": 20,
            "wavelet_family": "sym2",
            "n_frequency_pattern": {"v_proj": 10, "model.layers.1.mlp.down_proj": 200},
        },
        LLAMA,
    ),
    Case("waveft-gpt2", {"target_modules": ["c_attn", "c_fc"], "n_frequency": 100, "wavelet_family": "db2"}, GPT2),
    Case(
        "waveft-adapter-bf16",
        {"target_modules": ATTN_MLP, "n_frequency": 60, "wavelet_family": "coif1"},
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


def test_verify_passes_a_correct_merge_and_fails_a_doubled_one(model_cache, tmp_path: Path) -> None:
    case = Case(
        "verify", {"target_modules": ["q_proj", "down_proj"], "n_frequency": 80, "wavelet_family": "db3"}, LLAMA
    )
    check_verify_catches_double_merge(case, model_cache, tmp_path, changed=4)


def test_plan_and_card_words(model_cache, tmp_path: Path) -> None:
    base = model_cache(LLAMA)
    settings = {"n_frequency": 80, "wavelet_family": "db3", "n_frequency_pattern": {"down_proj": 90}}
    adapter = build_method_adapter(base, tmp_path / "adapter", "WAVEFT", target_modules=["q_proj", "down_proj"],
                                   **settings)  # fmt: skip
    result = merge(base, adapter, tmp_path / "merged", progress=False)
    modules = result.prepared.adapter.method_modules
    method = method_of("WAVEFT")
    assert method is not None
    assert {method.describe(m) for m in modules} == {
        "WaveFT 80 coefficients, db3 IDWT, scaling 25",
        "WaveFT 90 coefficients, db3 IDWT, scaling 25",
    }
    assert method.summary(modules) == "n_frequency = 80–90, scaling = 25, wavelet_family = db3"


def test_refuses_a_family_peft_has_no_filters_for(model_cache, tmp_path: Path) -> None:
    base = model_cache(LLAMA)
    adapter = build_method_adapter(base, tmp_path / "adapter", "WAVEFT", target_modules=["q_proj"], n_frequency=40,
                                   wavelet_family="db11")  # fmt: skip
    with pytest.raises(UnsupportedError) as e:
        merge(base, adapter, tmp_path / "merged", progress=False)
    assert str(e.value).splitlines()[0] == (
        "`model.layers.0.self_attn.q_proj.weight`: WaveFT with wavelet_family 'db11' is not merged: PEFT 0.21's WaveFT "
        "accepts that family in its config but has no filters for it, so its own merge (and forward pass) fails."
    )


def test_refuses_a_spectrum_the_config_does_not_make(model_cache, tmp_path: Path) -> None:
    base = model_cache(LLAMA)
    adapter = build_method_adapter(base, tmp_path / "adapter", "WAVEFT", target_modules=["q_proj"], n_frequency=40)
    edit_config(adapter, n_frequency_pattern={"q_proj": 50})
    with pytest.raises(IncompatibleError) as e:
        merge(base, adapter, tmp_path / "merged", progress=False)
    assert str(e.value).splitlines()[0] == (
        "Shape mismatch for `model.layers.0.self_attn.q_proj.weight`: the base tensor is [16, 16], but the adapter's "
        "waveft_spectrum has 40 coefficients, while its n_frequency_pattern['q_proj'] makes PEFT build 50 for this "
        "layer."
    )


def test_refuses_a_base_with_fewer_places_than_coefficients(model_cache, tmp_path: Path) -> None:
    base = model_cache(LLAMA)
    adapter = build_method_adapter(base, tmp_path / "adapter", "WAVEFT", target_modules=["q_proj"], n_frequency=100)
    narrower = model_cache({**LLAMA, "hidden_size": 8})
    with pytest.raises(IncompatibleError) as e:
        merge(narrower, adapter, tmp_path / "merged", progress=False)
    assert str(e.value).splitlines()[0] == (
        "Shape mismatch for `model.layers.0.self_attn.q_proj.weight`: the base tensor is [8, 8], but the adapter's "
        "waveft_spectrum has 100 coefficients, more than the 8 x 8 = 64 places of a weight of 8 outputs and 8 inputs."
    )


def test_shape_problems_in_words() -> None:
    method = method_of("WAVEFT")
    assert method is not None

    @dataclass(frozen=True)
    class Info:
        name: str
        shape: tuple[int, ...]

    m = method.module("h.0.attn.c_attn", {"waveft_spectrum": Info("s", (30,))}, {"n_frequency": 30}, Path("a"))
    assert method.shape_problem(m, "weight", (16, 48), True) is None  # Conv1D: (in, out)
    conv = method.shape_problem(m, "weight", (48, 16, 1, 1), False)
    assert isinstance(conv, Unsupported)
    assert conv == "WaveFT on a 4-D weight is not merged (PEFT's WaveFT adapts only Linear and Conv1D layers)"
