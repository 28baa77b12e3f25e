"""BOFT against PEFT: each output tensor bit-identical to ``merge_and_unload()`` on CPU, on fp32, bf16 and fp16
bases (Linear and Conv2d layers; boft_block_size or boft_block_num; one butterfly factor, as PEFT builds on CPU,
and several, as PEFT builds with its CUDA extension, here stood in for by ``torch.block_diag``; attention biases;
a bf16 adapter); the merged folder loaded with plain transformers behaves as PEFT's unmerged model; ``verify``;
and what loraship refuses.

Every merge is checked against PEFT's own BOFT layers built on the meta device (their permutations, which PEFT
builds by indexing, are made there by the check's stand-ins for PEFT's ``block_butterfly_perm`` and ``perm2mat``,
in place only while it builds): the tests run that check as merges do.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import (
    LLAMA,
    QWEN2,
    RESNET,
    assert_changes_as_planned,
    assert_same_tensors,
    load_tensors,
    peft_outputs,
    peft_reference,
    plain_outputs,
)

from loraship.engine.merge import merge
from loraship.errors import AdapterError, IncompatibleError, UnsupportedError
from loraship.methods.base import method_of
from loraship.tiny import build_method_adapter

ATTN_MLP = ["q_proj", "v_proj", "up_proj", "down_proj"]
#: The ResNet's encoder convolutions (1x1 and 3x3; the 7x7 stem has 3 x 49 inputs, which no even block divides).
ENCODER_CONVS = r".*encoder.*convolution"


@dataclass(frozen=True)
class Case:
    id: str
    settings: dict[str, Any]
    config: dict[str, Any]
    model_class: str = "AutoModelForCausalLM"
    adapter_dtype: str | None = None
    inputs: str = "tokens"
    fbd: bool = False  # PEFT with its CUDA extension (several butterfly factors)


def _conv(id: str, settings: dict[str, Any], fbd: bool = False) -> Case:
    return Case(id, settings, RESNET, model_class="AutoModelForImageClassification", inputs="pixels", fbd=fbd)


CASES = [
    Case("boft-block-size", {"target_modules": ATTN_MLP, "boft_block_size": 4}, LLAMA),
    Case("boft-block-num", {"target_modules": ATTN_MLP, "boft_block_size": 0, "boft_block_num": 2}, LLAMA),
    Case(  # on CPU PEFT builds one factor whatever the config says
        "boft-config-factor-2-without-extension",
        {"target_modules": ATTN_MLP, "boft_block_size": 2, "boft_n_butterfly_factor": 2},
        LLAMA,
    ),
    Case(
        "boft-butterfly-2-block-size",
        {"target_modules": ATTN_MLP, "boft_block_size": 2, "boft_n_butterfly_factor": 2},
        LLAMA,
        fbd=True,
    ),
    Case(
        "boft-butterfly-3-block-num",
        {"target_modules": ATTN_MLP, "boft_block_size": 0, "boft_block_num": 4, "boft_n_butterfly_factor": 3},
        LLAMA,
        fbd=True,
    ),
    Case("boft-bias", {"target_modules": ["q_proj", "k_proj", "o_proj"], "boft_block_size": 4}, QWEN2),
    Case(
        "boft-adapter-bf16",
        {"target_modules": ["q_proj", "o_proj"], "boft_block_size": 8},
        LLAMA,
        adapter_dtype="bfloat16",
    ),
    _conv("boft-conv2d", {"target_modules": ENCODER_CONVS, "boft_block_size": 2}),
    _conv(
        "boft-conv2d-butterfly-2",
        {"target_modules": r".*(layer\.0|shortcut)\.convolution", "boft_block_size": 2, "boft_n_butterfly_factor": 2},
        fbd=True,
    ),
]
DTYPES = ["float32", "bfloat16", "float16"]


def test_plan_check_builds_peft_boft_layers_on_meta(model_cache, extension, tmp_path: Path) -> None:
    """The check against PEFT's layers on the meta device builds BOFT's (permutations included, several butterfly
    factors too) and places every adapter tensor; PEFT's own layer methods are left as they were."""
    import peft.tuners.boft.layer as layer

    own = (layer.BOFTLayer.block_butterfly_perm, layer.BOFTLayer.perm2mat)
    extension(True)
    base = model_cache(LLAMA)
    adapter = build_method_adapter(
        base, tmp_path / "adapter", "BOFT", target_modules=ATTN_MLP, boft_block_size=2, boft_n_butterfly_factor=2
    )
    result = merge(base, adapter, tmp_path / "merged", progress=False)
    names = result.prepared.names
    assert names is not None and names.skipped is None and names.agrees
    assert names.checked == len(result.prepared.adapter.tensors) > 0
    assert (layer.BOFTLayer.block_butterfly_perm, layer.BOFTLayer.perm2mat) == own


class _FakeFbd:
    """What PEFT's ``fbd_cuda`` extension computes (blocks laid out on a diagonal), on CPU."""

    @staticmethod
    def forward(blocks: torch.Tensor) -> list[torch.Tensor]:
        return [torch.stack([torch.block_diag(*torch.unbind(f)) for f in blocks])]


@pytest.fixture
def extension(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Call with True to make PEFT take its CUDA extension path (as on a GPU with the extension built)."""

    def use(on: bool) -> None:
        if on:
            import peft.tuners.boft.layer as layer

            monkeypatch.setattr(layer, "get_fbd_cuda", lambda: _FakeFbd)

    yield use


def _inputs(kind: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    if kind == "pixels":
        return {"pixel_values": torch.randn(1, 3, 16, 16, generator=g)}
    return {"input_ids": torch.randint(0, 30, (1, 9), generator=g)}


def _adapter(case: Case, base: Path, folder: Path) -> Path:
    return build_method_adapter(
        base, folder, "BOFT", model_class=case.model_class, adapter_dtype=case.adapter_dtype, **case.settings
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bit_identical_to_peft(case: Case, dtype: str, model_cache, extension, tmp_path: Path) -> None:
    extension(case.fbd)
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
def test_merged_folder_behaves_like_base_plus_adapter(case: Case, model_cache, extension, tmp_path: Path) -> None:
    extension(case.fbd)
    base = model_cache(case.config, model_class=case.model_class, dtype="float32")
    adapter = _adapter(case, base, tmp_path / "adapter")
    merge(base, adapter, tmp_path / "merged", progress=False)
    inputs = _inputs(case.inputs)
    expected = peft_outputs(base, adapter, inputs, model_class=case.model_class)
    actual = plain_outputs(tmp_path / "merged", inputs, model_class=case.model_class)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


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


def test_plan_and_card_words(model_cache, extension, tmp_path: Path) -> None:
    extension(True)
    base = model_cache(LLAMA)
    adapter = build_method_adapter(
        base, tmp_path / "adapter", "BOFT", target_modules=["q_proj", "up_proj"], boft_block_size=2,
        boft_n_butterfly_factor=2,
    )  # fmt: skip
    result = merge(base, adapter, tmp_path / "merged", progress=False)
    modules = result.prepared.adapter.method_modules
    method = method_of("BOFT")
    assert method is not None and method.kind == "multiplicative"
    assert {method.describe(m) for m in modules} == {"BOFT 8 blocks of 2, 2 butterfly factors"}
    assert method.summary(modules) == "block size = 2, butterfly factors = 2"


def _edit_config(adapter: Path, **changes: Any) -> None:
    path = adapter / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_refuses_a_base_of_other_width(model_cache, tmp_path: Path) -> None:
    base = model_cache(LLAMA)
    adapter = build_method_adapter(base, tmp_path / "adapter", "BOFT", target_modules=["q_proj"], boft_block_size=4)
    wider = model_cache({**LLAMA, "hidden_size": 32})
    with pytest.raises(IncompatibleError) as e:
        merge(wider, adapter, tmp_path / "merged", progress=False)
    assert e.value.message == (
        "Shape mismatch for `model.layers.0.self_attn.q_proj.weight`: the base tensor is [32, 32], but the adapter's "
        "boft_R [1, 4, 4, 4] is not the [1, 8, 4, 4] PEFT makes for input features = 32."
    )


def test_refuses_a_block_size_that_does_not_divide(model_cache, tmp_path: Path) -> None:
    base = model_cache(LLAMA)
    adapter = build_method_adapter(base, tmp_path / "adapter", "BOFT", target_modules=["q_proj"], boft_block_size=4)
    _edit_config(adapter, boft_block_size=3)
    with pytest.raises(IncompatibleError) as e:
        merge(base, adapter, tmp_path / "merged", progress=False)
    assert e.value.message == (
        "Shape mismatch for `model.layers.0.self_attn.q_proj.weight`: the base tensor is [16, 16], but the adapter's "
        "boft_R [1, 4, 4, 4] cannot be built for input features = 16: PEFT needs them divisible by "
        "boft_block_size = 3."
    )


def test_refuses_block_size_and_block_num_both_set(model_cache, tmp_path: Path) -> None:
    base = model_cache(LLAMA)
    adapter = build_method_adapter(base, tmp_path / "adapter", "BOFT", target_modules=["q_proj"], boft_block_size=4)
    _edit_config(adapter, boft_block_num=4)
    with pytest.raises(AdapterError) as e:
        merge(base, adapter, tmp_path / "merged", progress=False)
    assert e.value.message == (
        f"`{adapter}` sets boft_block_size = 4 and boft_block_num = 4, but PEFT's BOFTConfig needs exactly one of "
        "them non-zero (boft_block_size x boft_block_num = the layer's input features)."
    )


def test_refuses_factors_the_config_does_not_make(model_cache, extension, tmp_path: Path) -> None:
    extension(True)
    base = model_cache(LLAMA)
    adapter = build_method_adapter(
        base, tmp_path / "adapter", "BOFT", target_modules=["q_proj"], boft_block_size=2, boft_n_butterfly_factor=2
    )
    _edit_config(adapter, boft_n_butterfly_factor=3)
    with pytest.raises(AdapterError) as e:
        merge(base, adapter, tmp_path / "merged", progress=False)
    assert e.value.message == (
        f"`{adapter}`: the BOFT module `model.layers.0.self_attn.q_proj` has boft_R [2, 8, 2, 2] with 2 butterfly "
        "factors, but its config sets boft_n_butterfly_factor = 3; PEFT makes 3 with its CUDA extension and 1 "
        "without it, and cannot load the adapter either way."
    )


def test_refuses_the_stem_convolution_no_block_divides(model_cache, tmp_path: Path) -> None:
    """PEFT cannot build BOFT on the 7x7 stem (3 x 49 inputs) with blocks of 2 either."""
    base = model_cache(RESNET, model_class="AutoModelForImageClassification")
    adapter = build_method_adapter(base, tmp_path / "adapter", "BOFT", model_class="AutoModelForImageClassification",
                                   target_modules=ENCODER_CONVS, boft_block_size=2)  # fmt: skip
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "boft_block_size": 3}))
    with pytest.raises(IncompatibleError, match=r"cannot be built for in_channels x kernel x kernel = \d+: PEFT needs"):
        merge(base, adapter, tmp_path / "merged", progress=False)


def test_shape_problems_in_words() -> None:
    """What PEFT's BOFT does not adapt: Conv1D (weights stored (in, out)), non-square kernels, 3-D weights."""

    method = method_of("BOFT")
    assert method is not None

    @dataclass(frozen=True)
    class Info:
        name: str
        shape: tuple[int, ...]

    m = method.module(
        "c_attn", {"boft_R": Info("r", (1, 4, 4, 4)), "boft_s": Info("s", (48, 1))}, {"boft_block_size": 4}, Path("a")
    )
    assert method.shape_problem(m, "weight", (48, 16), False) is None
    assert method.shape_problem(m, "weight", (16, 48), True) == (
        "BOFT on a Conv1D layer (weights stored (in, out)) is not merged by loraship (PEFT's BOFT adapts only Linear "
        "and Conv2d layers)"
    )
    assert method.shape_problem(m, "weight", (48, 4, 1, 4), False) == (
        "BOFT on a convolution with a non-square 1x4 kernel is not merged by loraship (PEFT's BOFT sizes its "
        "rotation for a square kernel)"
    )
    assert method.shape_problem(m, "weight", (48, 4, 4), False) == (
        "BOFT on a 3-D weight is not merged (PEFT's BOFT adapts only Linear and Conv2d layers)"
    )
    assert method.shape_problem(m, "weight", (40, 16), False) == (
        "the adapter's boft_s [48, 1] is not the [40, 1] PEFT makes for it"
    )


def test_conv1d_refused_in_the_plan(model_cache, tmp_path: Path) -> None:
    """An adapter for a Linear model merged into GPT-2 names (Conv1D): refused as unsupported, not misapplied."""
    from conftest import GPT2

    base = model_cache(LLAMA)
    adapter = build_method_adapter(base, tmp_path / "adapter", "BOFT", target_modules=["q_proj"], boft_block_size=4)
    gpt2 = model_cache(GPT2)
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    from safetensors.torch import load_file, save_file

    saved = load_file(str(weights))
    renamed = {k.replace("model.layers.0.self_attn.q_proj", "transformer.h.0.attn.c_attn"): v for k, v in saved.items()}
    save_file({k: v for k, v in renamed.items() if "c_attn" in k}, str(weights))
    with pytest.raises(UnsupportedError) as e:
        merge(gpt2, adapter, tmp_path / "merged", progress=False)
    assert e.value.message == (
        "`transformer.h.0.attn.c_attn.weight`: BOFT on a Conv1D layer (weights stored (in, out)) is not merged by "
        "loraship (PEFT's BOFT adapts only Linear and Conv2d layers)."
    )
