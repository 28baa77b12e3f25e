"""PVeRA against PEFT: each output tensor bit-identical to ``merge_and_unload()`` on CPU, on fp32, bf16 and fp16 bases
(layers of different sizes, GPT-2's Conv1D, projections saved or drawn again from ``projection_prng_key``, a bf16
adapter); the merged folder loaded with plain transformers behaves as PEFT's unmerged model (which uses the mean);
verify passes a correct merge and fails a doubled one; and ``sample_at_inference`` is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import GPT2, LLAMA
from methods.harness import DTYPES, check_behaves_like_peft, check_bit_identical, check_verify_catches_double_merge
from methods.harness import Case as MethodCase

from loraship.engine.merge import merge
from loraship.errors import UnsupportedError
from loraship.methods.base import method_of
from loraship.tiny import build_method_adapter

ATTN_MLP = ["q_proj", "v_proj", "up_proj", "down_proj"]


class Case(MethodCase):
    peft_type = "PVERA"


CASES = [
    Case("pvera-sizes", {"target_modules": ATTN_MLP, "r": 4}, LLAMA),
    Case(
        "pvera-seeded-projections",
        {"target_modules": ATTN_MLP, "r": 3, "save_projection": False, "projection_prng_key": 7},
        LLAMA,
    ),
    Case("pvera-gpt2", {"target_modules": ["c_attn", "c_fc", "c_proj"], "r": 2}, GPT2),
    Case("pvera-adapter-bf16", {"target_modules": ["q_proj", "down_proj"], "r": 4}, LLAMA, adapter_dtype="bfloat16"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bit_identical_to_peft(case: Case, dtype: str, model_cache, tmp_path: Path) -> None:
    check_bit_identical(case, dtype, model_cache, tmp_path)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_merged_folder_behaves_like_base_plus_adapter(case: Case, model_cache, tmp_path: Path) -> None:
    check_behaves_like_peft(case, model_cache, tmp_path)


def test_verify_passes_a_correct_merge_and_fails_a_doubled_one(model_cache, tmp_path: Path) -> None:
    case = Case("verify", {"target_modules": ["q_proj", "down_proj"], "r": 4, "save_projection": False}, LLAMA)
    check_verify_catches_double_merge(case, model_cache, tmp_path, changed=4)


def test_plan_words(model_cache, tmp_path: Path) -> None:
    base = model_cache(LLAMA)
    adapter = build_method_adapter(base, tmp_path / "adapter", "PVERA", target_modules=["q_proj"], r=4)
    result = merge(base, adapter, tmp_path / "merged", progress=False)
    method = method_of("PVERA")
    assert method is not None
    assert {method.describe(m) for m in result.prepared.adapter.method_modules} == {"PVeRA r=4"}
    assert method.summary(result.prepared.adapter.method_modules) == (
        "r = 4, projection_prng_key = 0, save_projection = true"
    )


def test_refuses_sampling_at_inference(model_cache, tmp_path: Path) -> None:
    base = model_cache(LLAMA)
    adapter = build_method_adapter(base, tmp_path / "adapter", "PVERA", target_modules=["q_proj"], r=4,
                                   sample_at_inference=True)  # fmt: skip
    with pytest.raises(UnsupportedError) as e:
        merge(base, adapter, tmp_path / "merged", progress=False)
    assert str(e.value).splitlines()[0] == (
        f"`{adapter}` sets `sample_at_inference` to true: PVeRA then draws new noise around the adapter's mean at "
        "every forward pass, which no merged weight can stand for (PEFT's merge keeps only the mean)."
    )


def test_refuses_a_rank_the_lambdas_do_not_have(model_cache, tmp_path: Path) -> None:
    from loraship.errors import IncompatibleError

    base = model_cache(LLAMA)
    adapter = build_method_adapter(base, tmp_path / "adapter", "PVERA", target_modules=["q_proj"], r=4,
                                   save_projection=False)  # fmt: skip
    path = adapter / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "r": 8}))
    with pytest.raises(IncompatibleError) as e:
        merge(base, adapter, tmp_path / "merged", progress=False)
    assert str(e.value).splitlines()[0] == (
        "Shape mismatch for `model.layers.0.self_attn.q_proj.weight`: the base tensor is [16, 16], but the adapter's "
        "pvera_lambda_d has 8 values, while its r = 8 makes PEFT build 16."
    )
