"""OFT against PEFT: each output tensor bit-identical to ``merge_and_unload()`` on CPU, on fp32, bf16 and fp16
bases (Linear, Conv2d and Embedding layers; PEFT's default block size, ``r`` instead, sizes PEFT moves to a
divisor, the exact Cayley transform, other Neumann term counts, COFT, shared blocks, a bf16 adapter); the merged
folder loaded with plain transformers behaves as PEFT's unmerged model; and what loraship refuses.
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
    LLAMA_TIED,
    RESNET,
    assert_same_tensors,
    load_tensors,
    peft_outputs,
    peft_reference,
    plain_outputs,
)
from methods.harness import DTYPES, check_behaves_like_peft, check_bit_identical
from methods.harness import Case as MethodCase
from methods.harness import inputs as harness_inputs

from loraship.engine.merge import merge
from loraship.errors import AdapterError, IncompatibleError, UnsupportedError
from loraship.methods.base import method_of
from loraship.tiny import build_method_adapter

ATTN_MLP = ["q_proj", "v_proj", "up_proj", "down_proj"]
#: The ResNet's 1x1 convolutions: PEFT's unmerged forward of a larger kernel (unfold, rotate, fold: overlapping
#: patches summed) is no convolution's, PEFT's merged one included, so loraship refuses those.
ONE_BY_ONE = r".*(layer\.[02]|shortcut)\.convolution"


@dataclass(frozen=True)
class Case(MethodCase):
    peft_type = "OFT"

    outputs_target: Any = None  # target_modules for the outputs test, where PEFT's unmerged forward differs


def _conv(id: str, settings: dict[str, Any]) -> Case:
    """A case on a ResNet's 1x1 convolutions."""
    return Case(
        id, settings, RESNET, model_class="AutoModelForImageClassification", inputs="pixels", outputs_target=ONE_BY_ONE
    )


CASES = [
    # PEFT's defaults (r = 0, oft_block_size = 32): moved to the widths 16 and 24 (one block each)
    Case("oft-defaults", {"target_modules": ATTN_MLP}, LLAMA),
    Case("oft-block-size-4", {"target_modules": ATTN_MLP, "oft_block_size": 4}, LLAMA),
    Case("oft-block-size-adjusted", {"target_modules": ATTN_MLP, "oft_block_size": 7}, LLAMA),  # 8 and 6
    Case("oft-r", {"target_modules": ATTN_MLP, "r": 4, "oft_block_size": 0}, LLAMA),
    Case("oft-exact-cayley", {"target_modules": ATTN_MLP, "oft_block_size": 4, "use_cayley_neumann": False}, LLAMA),
    Case(
        "oft-neumann-2-terms", {"target_modules": ATTN_MLP, "oft_block_size": 4, "num_cayley_neumann_terms": 2}, LLAMA
    ),
    Case(
        "oft-neumann-8-terms", {"target_modules": ATTN_MLP, "oft_block_size": 8, "num_cayley_neumann_terms": 8}, LLAMA
    ),
    Case("oft-coft", {"target_modules": ATTN_MLP, "oft_block_size": 4, "coft": True, "eps": 1e-2}, LLAMA),
    Case(  # a radius most blocks lie within: projected and unprojected blocks side by side
        "oft-coft-wide-eps", {"target_modules": ATTN_MLP, "oft_block_size": 4, "coft": True, "eps": 0.6}, LLAMA
    ),
    Case(
        "oft-coft-exact",
        {
            "target_modules": ATTN_MLP,
            "r": 2,
            "oft_block_size": 0,
            "coft": True,
            "eps": 0.1,
            "use_cayley_neumann": False,
        },
        LLAMA,
    ),
    Case("oft-block-share", {"target_modules": ATTN_MLP, "oft_block_size": 4, "block_share": True}, LLAMA),
    Case(
        "oft-adapter-bf16",
        {"target_modules": ["q_proj", "o_proj"], "oft_block_size": 4},
        LLAMA,
        adapter_dtype="bfloat16",
    ),
    Case("oft-embedding", {"target_modules": ["embed_tokens", "q_proj"], "oft_block_size": 4}, LLAMA),
    _conv("oft-conv2d", {"target_modules": ONE_BY_ONE, "oft_block_size": 4}),
    _conv(  # one block the whole input, solved exactly
        "oft-conv2d-r-exact",
        {"target_modules": ONE_BY_ONE, "r": 1, "oft_block_size": 0, "use_cayley_neumann": False},
    ),
    _conv("oft-conv2d-block-share", {"target_modules": ONE_BY_ONE, "oft_block_size": 4, "block_share": True}),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bit_identical_to_peft(case: Case, dtype: str, model_cache, tmp_path: Path) -> None:
    check_bit_identical(case, dtype, model_cache, tmp_path)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_merged_folder_behaves_like_base_plus_adapter(case: Case, model_cache, tmp_path: Path) -> None:
    override = {"target_modules": case.outputs_target} if case.outputs_target else {}
    check_behaves_like_peft(case, model_cache, tmp_path, override=override)


@pytest.mark.parametrize("dtype", DTYPES)
def test_tied_embedding_is_rotated_on_its_own(dtype: str, model_cache, tmp_path: Path) -> None:
    """OFT on a tied input embedding: PEFT's unmerged model rotates only the lookups, so the merged model stores
    the rotated embedding (PEFT's merged bits) apart from the output embedding (the base's), as base + adapter
    behaves; PEFT's merge_and_unload rotates the shared tensor, changing the output embedding too."""
    base = model_cache(LLAMA_TIED, dtype=dtype)
    adapter = build_method_adapter(base, tmp_path / "adapter", "OFT", target_modules=["embed_tokens"], oft_block_size=4)
    merge(base, adapter, tmp_path / "merged", progress=False)
    reference = peft_reference(base, adapter, tmp_path / "peft", dtype=getattr(torch, dtype))
    ours, before = load_tensors(tmp_path / "merged"), load_tensors(base)
    assert_same_tensors({"e": ours["model.embed_tokens.weight"]}, {"e": reference["model.embed_tokens.weight"]})
    assert_same_tensors({"e": ours["lm_head.weight"]}, {"e": before["model.embed_tokens.weight"]})
    if dtype == "float32":
        inputs = harness_inputs("tokens")
        expected = peft_outputs(base, adapter, inputs)
        torch.testing.assert_close(plain_outputs(tmp_path / "merged", inputs), expected, rtol=1e-4, atol=1e-4)


def test_plan_and_card_words(model_cache, tmp_path: Path) -> None:
    base = model_cache(LLAMA)
    adapter = build_method_adapter(
        base, tmp_path / "adapter", "OFT", target_modules=["q_proj", "down_proj"], oft_block_size=8
    )
    result = merge(base, adapter, tmp_path / "merged", progress=False)
    modules = result.prepared.adapter.method_modules
    method = method_of("OFT")
    assert method is not None and method.kind == "multiplicative"
    assert {method.describe(m) for m in modules} == {
        "OFT 2 blocks of 8 (Cayley-Neumann, 5 terms)",
        "OFT 3 blocks of 8 (Cayley-Neumann, 5 terms)",
    }
    assert method.summary(modules) == "block size = 8, Cayley-Neumann, 5 terms"
    shared = build_method_adapter(
        base, tmp_path / "shared", "OFT", target_modules=["q_proj"], r=4, oft_block_size=0, block_share=True,
        coft=True, use_cayley_neumann=False,
    )  # fmt: skip
    result = merge(base, shared, tmp_path / "merged-shared", progress=False)
    modules = result.prepared.adapter.method_modules
    assert {method.describe(m) for m in modules} == {"OFT one block of 4 shared (exact Cayley, COFT eps=6e-05)"}
    assert method.summary(modules) == "block size = 4, exact Cayley, COFT eps=6e-05, blocks shared"


def test_refuses_a_base_of_other_width(model_cache, tmp_path: Path) -> None:
    base = model_cache(LLAMA)
    adapter = build_method_adapter(base, tmp_path / "adapter", "OFT", target_modules=["q_proj"], oft_block_size=4)
    wider = model_cache({**LLAMA, "hidden_size": 32})
    with pytest.raises(
        IncompatibleError,
        match=r"Shape mismatch for `model\.layers\.0\.self_attn\.q_proj\.weight`: the base tensor is \[32, 32\], but "
        r"the adapter's oft_R \[4, 6\] is not the \[8, 6\] PEFT makes for input features = 32 \(blocks of 4\)\.",
    ):
        merge(wider, adapter, tmp_path / "merged", progress=False)


def _edit_config(adapter: Path, **changes: Any) -> None:
    path = adapter / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        del config[key]
    path.write_text(json.dumps(config))


def test_refuses_tensors_that_do_not_match_the_config(model_cache, tmp_path: Path) -> None:
    """PEFT sizes oft_R from the config and the layer; a tensor of another block layout does not load."""
    base = model_cache(LLAMA)
    adapter = build_method_adapter(base, tmp_path / "adapter", "OFT", target_modules=["q_proj"], oft_block_size=4)
    _edit_config(adapter, oft_block_size=8)
    with pytest.raises(IncompatibleError, match=r"oft_R \[4, 6\] is not the \[2, 28\] PEFT makes"):
        merge(base, adapter, tmp_path / "merged", progress=False)


def test_refuses_r_and_block_size_both_set(model_cache, tmp_path: Path) -> None:
    base = model_cache(LLAMA)
    adapter = build_method_adapter(base, tmp_path / "adapter", "OFT", target_modules=["q_proj"], oft_block_size=4)
    _edit_config(adapter, r=4)
    with pytest.raises(AdapterError, match=r"sets r = 4 and oft_block_size = 4, but PEFT's OFTConfig needs exactly"):
        merge(base, adapter, tmp_path / "merged", progress=False)


def test_refuses_an_adapter_of_peft_before_0_14(model_cache, tmp_path: Path) -> None:
    base = model_cache(LLAMA)
    adapter = build_method_adapter(base, tmp_path / "adapter", "OFT", target_modules=["q_proj"], oft_block_size=4)
    _edit_config(adapter, oft_block_size=None)
    with pytest.raises(AdapterError, match=r"has no `oft_block_size`: it is an OFT adapter of PEFT before 0\.14"):
        merge(base, adapter, tmp_path / "merged", progress=False)


def test_refuses_a_field_of_the_wrong_type(model_cache, tmp_path: Path) -> None:
    base = model_cache(LLAMA)
    adapter = build_method_adapter(base, tmp_path / "adapter", "OFT", target_modules=["q_proj"], oft_block_size=4)
    _edit_config(adapter, use_cayley_neumann="yes")
    with pytest.raises(AdapterError, match=r"sets `use_cayley_neumann` to \"yes\", but PEFT expects true or false"):
        merge(base, adapter, tmp_path / "merged", progress=False)


def test_kxk_convolution_refused_as_peft_merges_it_wrongly(model_cache, tmp_path: Path) -> None:
    """PEFT's merge of OFT on a 3x3 or 7x7 convolution changes the outputs about as much as the adapter does."""
    base = model_cache(RESNET, model_class="AutoModelForImageClassification")
    adapter = build_method_adapter(base, tmp_path / "adapter", "OFT", model_class="AutoModelForImageClassification",
                                   target_modules=["convolution"], oft_block_size=3)  # fmt: skip
    with pytest.raises(UnsupportedError) as e:
        merge(base, adapter, tmp_path / "merged", progress=False)
    assert (e.value.message, e.value.fix) == (
        "`resnet.embedder.embedder.convolution.weight`: OFT on a 7x7 convolution is not merged: PEFT rotates the "
        "unfolded input patches and folds them back, and no "
        "convolution weight (PEFT's merged one included, which rotates the flattened kernel) behaves like that, so "
        "the merged model would not behave like base + adapter (loraship merges OFT on 1x1 convolutions, Linear and "
        "Embedding layers).",
        "Keep this adapter unmerged (load it with PEFT on top of the base model), or train it without OFT on such "
        "layers.",
    )
    assert not (tmp_path / "merged").exists()


def test_shape_problems_in_words() -> None:
    """What PEFT's OFT does not adapt: Conv1D (weights stored (in, out)), non-square kernels, 3-D weights."""
    from loraship.methods.base import MethodModule

    method = method_of("OFT")
    assert method is not None

    @dataclass(frozen=True)
    class Info:
        name: str
        shape: tuple[int, ...]

    m = method.module("c_attn", {"oft_R.weight": Info("x", (4, 6))}, {"oft_block_size": 4}, Path("a"))
    assert isinstance(m, MethodModule)
    assert method.shape_problem(m, "weight", (48, 16), False) is None
    assert "Conv1D" in (method.shape_problem(m, "weight", (16, 48), True) or "")
    assert "OFT on a 1x3 convolution is not merged" in (method.shape_problem(m, "weight", (4, 4, 1, 3), False) or "")
    assert "3-D weight" in (method.shape_problem(m, "weight", (4, 4, 3), False) or "")
    assert method.shape_problem(m, "weight", (16, 16, 1, 1), False) is None
    assert "grouped" in (method.shape_problem(m, "weight", (16, 8, 1, 1), False) or "")
