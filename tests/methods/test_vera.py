"""VeRA against PEFT: each output tensor bit-identical to ``merge_and_unload()`` on CPU, on fp32, bf16 and fp16 bases
(layers of different sizes, each with its slice of the shared projections; GPT-2's Conv1D; projections saved or
drawn again from ``projection_prng_key``; a bf16 adapter); the merged folder loaded with plain transformers behaves
as PEFT's unmerged model; verify passes a correct merge and fails a doubled one; and what loraship refuses.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import GPT2, LLAMA, assert_same_tensors, load_tensors, peft_reference
from methods.harness import (
    DTYPES,
    check_behaves_like_peft,
    check_bit_identical,
    check_verify_catches_double_merge,
    edit_config,
)
from methods.harness import Case as MethodCase
from safetensors.torch import load_file, save_file

from loraship.engine.merge import merge
from loraship.errors import AdapterError, IncompatibleError
from loraship.methods.base import Unsupported, method_of
from loraship.tiny import build_method_adapter

#: The tiny Llama's q_proj is 16 x 16, v_proj 8 x 16, up_proj 24 x 16, down_proj 16 x 24: the shared projections
#: are sized (r, 24) and (24, r), and each layer takes its slice.
ATTN_MLP = ["q_proj", "v_proj", "up_proj", "down_proj"]


class Case(MethodCase):
    peft_type = "VERA"


CASES = [
    Case("vera-sizes", {"target_modules": ATTN_MLP, "r": 4}, LLAMA),
    Case("vera-one-size", {"target_modules": ["q_proj", "o_proj"], "r": 8}, LLAMA),
    Case(
        "vera-seeded-projections",
        {"target_modules": ATTN_MLP, "r": 4, "save_projection": False, "projection_prng_key": 123},
        LLAMA,
    ),
    Case("vera-gpt2", {"target_modules": ["c_attn", "c_fc", "c_proj"], "r": 3}, GPT2),
    Case("vera-gpt2-seeded", {"target_modules": ["c_attn", "c_fc"], "r": 5, "save_projection": False}, GPT2),
    Case("vera-adapter-bf16", {"target_modules": ATTN_MLP, "r": 4}, LLAMA, adapter_dtype="bfloat16"),
    Case(
        "vera-adapter-bf16-seeded",
        {"target_modules": ["q_proj", "down_proj"], "r": 4, "save_projection": False},
        LLAMA,
        adapter_dtype="bfloat16",
    ),
]


def _drop_tensors(adapter: Path, *names: str) -> None:
    path = adapter / "adapter_model.safetensors"
    tensors = {k: v for k, v in load_file(str(path)).items() if k not in names}
    save_file(tensors, str(path), metadata={"format": "pt"})


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bit_identical_to_peft(case: Case, dtype: str, model_cache, tmp_path: Path) -> None:
    check_bit_identical(case, dtype, model_cache, tmp_path)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_merged_folder_behaves_like_base_plus_adapter(case: Case, model_cache, tmp_path: Path) -> None:
    check_behaves_like_peft(case, model_cache, tmp_path)


@pytest.mark.parametrize("save_projection", [True, False])
def test_verify_passes_a_correct_merge_and_fails_a_doubled_one(
    save_projection: bool, model_cache, tmp_path: Path
) -> None:
    case = Case(
        "verify", {"target_modules": ["q_proj", "down_proj"], "r": 4, "save_projection": save_projection}, LLAMA
    )
    check_verify_catches_double_merge(case, model_cache, tmp_path, changed=4)  # two layers


def test_the_seed_draws_the_projections(model_cache, tmp_path: Path) -> None:
    """Without saved projections, another projection_prng_key (edited after saving) draws other ones: the merge
    differs from the correct one, and is PEFT's for the edited config."""
    base = model_cache(LLAMA)
    adapter = build_method_adapter(base, tmp_path / "adapter", "VERA", target_modules=["q_proj"], r=4,
                                   save_projection=False)  # fmt: skip
    merge(base, adapter, tmp_path / "merged", progress=False)
    edit_config(adapter, projection_prng_key=1)
    merge(base, adapter, tmp_path / "merged-edited", progress=False)
    right, wrong = load_tensors(tmp_path / "merged"), load_tensors(tmp_path / "merged-edited")
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(right[name], wrong[name])
    assert_same_tensors(wrong, peft_reference(base, adapter, tmp_path / "peft-edited", dtype=torch.float32))


def test_plan_and_card_words(model_cache, tmp_path: Path) -> None:
    base = model_cache(LLAMA)
    adapter = build_method_adapter(base, tmp_path / "adapter", "VERA", target_modules=["q_proj", "down_proj"], r=4,
                                   save_projection=False, projection_prng_key=5)  # fmt: skip
    result = merge(base, adapter, tmp_path / "merged", progress=False)
    modules = result.prepared.adapter.method_modules
    method = method_of("VERA")
    assert method is not None and method.kind == "additive"
    assert {method.describe(m) for m in modules} == {"VeRA r=4, projections from seed 5"}
    assert method.summary(modules) == "r = 4, projection_prng_key = 5, save_projection = false"
    # the shared projections are accounted for; drawn from the seed they are not in the file at all
    assert result.prepared.plan.accounting.keys() == set(result.prepared.adapter.tensors)


def test_refuses_saved_projections_for_other_layer_sizes(model_cache, tmp_path: Path) -> None:
    """PEFT sizes the shared projections to the largest targeted layers of the base it loads onto, and cannot load
    saved ones of another size."""
    base = model_cache(LLAMA)
    adapter = build_method_adapter(base, tmp_path / "adapter", "VERA", target_modules=["q_proj"], r=4)
    wider = model_cache({**LLAMA, "hidden_size": 32})
    with pytest.raises(IncompatibleError) as e:
        merge(wider, adapter, tmp_path / "merged", progress=False)
    assert str(e.value).splitlines()[0] == (
        "Shape mismatch for `model.layers.0.self_attn.q_proj.weight`: the base tensor is [32, 32], but the adapter's "
        "vera_lambda_b has 16 values, one per output of the layer it was trained on, not 32."
    )


def test_refuses_saved_projections_that_do_not_fit_the_largest_layer(model_cache, tmp_path: Path) -> None:
    base = model_cache(LLAMA)
    adapter = build_method_adapter(base, tmp_path / "adapter", "VERA", target_modules=["q_proj", "down_proj"], r=4)
    narrower = model_cache({**LLAMA, "intermediate_size": 16})  # down_proj 16 x 16: the projections PEFT builds shrink
    edit_config(adapter, target_modules=["q_proj", "down_proj"])
    with pytest.raises(IncompatibleError) as e:
        merge(narrower, adapter, tmp_path / "merged", progress=False)
    assert str(e.value).splitlines()[0] == (
        "Shape mismatch for `model.layers.0.mlp.down_proj.weight`: the base tensor is [16, 16], but the adapter's "
        "base_model.vera_A is [4, 24], while PEFT builds it [4, 16] for the largest layers this base has where the "
        "adapter applies (r = 4, 16 outputs, 16 inputs)."
    )


def test_refuses_missing_saved_projections(model_cache, tmp_path: Path) -> None:
    base = model_cache(LLAMA)
    adapter = build_method_adapter(base, tmp_path / "adapter", "VERA", target_modules=["q_proj"], r=4)
    _drop_tensors(adapter, "base_model.vera_A", "base_model.vera_B")
    with pytest.raises(AdapterError) as e:
        merge(base, adapter, tmp_path / "merged", progress=False)
    assert str(e.value).splitlines()[0] == (
        f"`{adapter}` sets `save_projection` to true, but the adapter file lacks `base_model.vera_A` and "
        "`base_model.vera_B`: PEFT refuses to load such a VeRA adapter."
    )


def test_refuses_saved_projections_the_config_says_are_drawn(model_cache, tmp_path: Path) -> None:
    base = model_cache(LLAMA)
    adapter = build_method_adapter(base, tmp_path / "adapter", "VERA", target_modules=["q_proj"], r=4)
    edit_config(adapter, save_projection=False)
    with pytest.raises(AdapterError) as e:
        merge(base, adapter, tmp_path / "merged", progress=False)
    assert str(e.value).splitlines()[0] == (
        f"`{adapter}` sets `save_projection` to false, but the adapter file holds `base_model.vera_A` and "
        "`base_model.vera_B`: PEFT would ignore them and draw the VeRA projections again from `projection_prng_key`, "
        "so which ones the adapter was trained with is unclear."
    )


def test_refuses_a_rank_the_lambdas_do_not_have(model_cache, tmp_path: Path) -> None:
    base = model_cache(LLAMA)
    adapter = build_method_adapter(base, tmp_path / "adapter", "VERA", target_modules=["q_proj"], r=4,
                                   save_projection=False)  # fmt: skip
    edit_config(adapter, r=6)
    with pytest.raises(IncompatibleError) as e:
        merge(base, adapter, tmp_path / "merged", progress=False)
    assert str(e.value).splitlines()[0] == (
        "Shape mismatch for `model.layers.0.self_attn.q_proj.weight`: the base tensor is [16, 16], but the adapter's "
        "vera_lambda_d has 4 values, while its r = 6 makes PEFT build 6."
    )


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"projection_prng_key": "0"}, 'sets `projection_prng_key` to "0", but PEFT expects a whole number (a torch '
         "seed) there."),
        ({"r": 0}, "sets `r` to 0, but PEFT expects a whole number from 1 there."),
        ({"save_projection": "yes"}, 'sets `save_projection` to "yes", but PEFT expects true or false there.'),
        ({"projection_prng_key": None}, "sets `projection_prng_key` to null, but PEFT's VeraConfig needs a value "
         "there to merge."),
    ],
)  # fmt: skip
def test_refuses_a_config_peft_cannot_merge(changes: dict[str, Any], message: str, model_cache, tmp_path: Path) -> None:
    base = model_cache(LLAMA)
    adapter = build_method_adapter(base, tmp_path / "adapter", "VERA", target_modules=["q_proj"], r=4)
    edit_config(adapter, **changes)
    with pytest.raises(AdapterError) as e:
        merge(base, adapter, tmp_path / "merged", progress=False)
    assert str(e.value).splitlines()[0].endswith(message)


def test_shape_problems_in_words() -> None:
    method = method_of("VERA")
    assert method is not None

    @dataclass(frozen=True)
    class Info:
        name: str
        shape: tuple[int, ...]

    tensors = {"vera_lambda_b": Info("b", (48,)), "vera_lambda_d": Info("d", (4,))}
    m = method.module("h.0.attn.c_attn", tensors, {"r": 4, "save_projection": False}, Path("a"))
    m = method.with_layers(m, (("h.0.attn.c_attn", 48, 16), ("h.0.mlp.c_fc", 64, 16)))
    assert method.shape_problem(m, "weight", (16, 48), True) is None  # Conv1D: (in, out)
    assert method.shape_problem(m, "weight", (48, 16), False) is None
    conv = method.shape_problem(m, "weight", (48, 16, 1, 1), False)
    assert conv == Unsupported(
        "VeRA on a 4-D weight is not merged (PEFT's VeRA adapts only Linear and Conv1D layers)"
    ) and isinstance(conv, Unsupported)
    with pytest.raises(AdapterError, match=r"has vera_lambda_b \[2, 3\], but PEFT saves it as one vector"):
        method.module("q", {**tensors, "vera_lambda_b": Info("x", (2, 3))}, {"save_projection": False}, Path("a"))
    with pytest.raises(AdapterError, match=r"has only vera_lambda_b, not all the tensors VeRA saves"):
        method.module("q", {"vera_lambda_b": Info("x", (3,))}, {}, Path("a"))
