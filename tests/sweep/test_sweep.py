"""Every architecture the installed transformers ships, as a new user would merge it (see :mod:`sweep`).

The default run takes a sample of each task's model types that rotates with the day (``SWEEP_DAY``, or the
day of the year), so that consecutive CI runs cover every family within a few runs: a silent wrong in any
family is caught within ``ceil(types / SAMPLE)`` days. ``pytest -m sweep`` runs all of them (`.ci/run` does,
and the newest-release job does, with the newest transformers and peft).

CI fails on any ``wrong`` or ``crash``, and on any ``refused`` that :data:`REFUSED` does not list with why.
``no-model`` and ``no-peft`` say nothing of loraship (the tiny config could not be built, or PEFT itself cannot
make or merge the adapter); the table lists them so coverage is visible.
"""

from __future__ import annotations

import datetime
import os
from collections import Counter
from pathlib import Path

import pytest
from sweep import TASKS, Outcome, model_types, run

#: Refusals allowed, each with why. Those marked "not yet" are loraship's own gaps (issue: every architecture),
#: refused with a message that names the conversion instead of merging wrong; the rest PEFT cannot merge right.
REFUSED: dict[str, str] = {
    "image-text-to-text:shieldgemma2": "transformers cannot load its own save of this model back: under "
    "AutoModelForImageTextToText the language model's 28 tensors come back missing (PrefixChange), so PEFT's base "
    "is random there; ShieldGemma2ForImageClassification, the class its checkpoints are for, merges "
    "(tests/engine/test_families.py)",
}
#: Cases that were refused or wrong once, each with the outcome it must keep: the MoE families PEFT's default
#: all-linear saves as bare parameter names, and the families whose checkpoint layout the names did not follow.
PINNED: dict[str, str] = {
    **{f"causal-lm:{t}": "exact" for t in (
        "mixtral", "qwen3_moe", "qwen3_next", "olmoe", "deepseek_v3", "deepseek_v32", "glm4_moe", "glm4_moe_lite",
        "glm_moe_dsa", "afmoe", "beam", "cohere2_moe", "ernie4_5_moe", "exaone_moe", "flex_olmo", "mellum", "minimax",
        "minimax_m2", "solar_open", "camembert", "xlm-roberta")},
    # PEFT's reload of the adapter leaves `sconv.weight_proj`'s LoRA out (through the checkpoint's renames): its
    # merge is off, loraship's is base + adapter as trained
    "causal-lm:inkling2_text": "correct",
    "seq2seq-lm:marian": "exact",  # sinusoidal positions the checkpoint never stores
    # parameters transformers cuts from one stored tensor (HRM's gate_up_proj and gqkv_proj, Qianfan-OCR's vision
    # qkv: Chunk) or joins of several (MiniMax-M3-VL's shared experts' gate_proj + up_proj: Concatenate)
    "causal-lm:hrm_text": "exact",
    "image-text-to-text:qianfan_ocr": "exact",
    "image-text-to-text:minimax_m3_vl": "exact",
    # PEFT's reload of the adapter leaves the vision tower's LoRA out; loraship merges base + adapter as trained
    "image-text-to-text:unlimited_ocr": "correct",
    # rows transformers permutes for rotary on load (PermuteForRope), after a Chunk (Kimi-K2.5's vision wqkv) or
    # alone (Mistral-Large-4's vision wq/wk; PEFT's merge of it is off, loraship's is base + adapter as trained)
    "image-text-to-text:kimi_k25": "exact",
    # in transformers 5.24+ (skipped where the installed one lacks them): uneven cuts (Split: LaRA-mini's
    # linear_attn.in_proj, Sarvam-MoE's and Param2-MoE's query_key_value) and 2-D kernels stored transposed (ERGO)
    **{f"causal-lm:{t}": "exact" for t in ("lara_mini", "sarvam_moe", "param2moe", "ergo")},
    "image-text-to-text:mistral_large4": "correct",
    "seq2seq-lm:musicflamingo": "exact",  # a size written as 1200.0 in transformers' own config
}  # fmt: skip
#: Model types of each task per default run.
SAMPLE = 6
#: Types too slow to build on 2 cores (over a minute each): only in the full sweep.
SLOW = {"longcat_flash"}

CASES = [(task, t) for task in TASKS for t in model_types(task)]


def _sample() -> list[tuple[str, str]]:
    day = int(os.environ.get("SWEEP_DAY") or datetime.date.today().timetuple().tm_yday)
    picked = []
    for task in TASKS:
        types = [t for t in model_types(task) if t not in SLOW]
        start = (day * SAMPLE) % len(types)
        picked.extend((task, types[(start + i) % len(types)]) for i in range(min(SAMPLE, len(types))))
    return picked


def _check(outcome: Outcome) -> None:
    print(f"{outcome.kind:8s} {outcome.id}: {outcome.detail}")
    if outcome.kind in ("wrong", "crash"):
        raise AssertionError(f"{outcome.id}: {outcome.kind}: {outcome.detail}")
    if outcome.kind == "refused" and outcome.id not in REFUSED:
        raise AssertionError(f"{outcome.id} is refused, and REFUSED does not say why that is right: {outcome.detail}")


@pytest.mark.parametrize(("task", "model_type"), _sample(), ids=lambda v: v)
def test_sampled_architecture(task: str, model_type: str, tmp_path: Path) -> None:
    _check(run(model_type, task, tmp_path))


@pytest.mark.parametrize("case", sorted(PINNED), ids=lambda v: v)
def test_pinned_architecture(case: str, tmp_path: Path) -> None:
    task, _, model_type = case.partition(":")
    outcome = run(model_type, task, tmp_path)
    if outcome.kind in ("no-model", "no-peft"):  # another transformers release: says nothing of loraship
        pytest.skip(f"{outcome.kind}: {outcome.detail}")
    assert (outcome.kind, outcome.id) == (PINNED[case], case), outcome.detail


@pytest.mark.parametrize(
    "case",
    [
        "causal-lm:hrm_text",
        "image-text-to-text:minimax_m3_vl",
        "image-text-to-text:kimi_k25",
        "causal-lm:qwen3_moe",
        "causal-lm:lara_mini",
        "causal-lm:ergo",
    ],
)
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_pinned_architecture_in_half_precision(case: str, dtype: str, tmp_path: Path) -> None:
    """Cut, joined and fused parameters round as PEFT's merge does on a half-precision base: bit for bit."""
    task, _, model_type = case.partition(":")
    outcome = run(model_type, task, tmp_path, dtype=dtype)
    if outcome.kind in ("no-model", "no-peft"):
        pytest.skip(f"{outcome.kind}: {outcome.detail}")
    assert outcome.kind == "exact", outcome.detail


#: Outcomes of the full sweep, in order, for its table.
SWEPT: list[Outcome] = []


@pytest.mark.sweep
@pytest.mark.parametrize(("task", "model_type"), CASES, ids=lambda v: v)
def test_every_architecture(task: str, model_type: str, tmp_path: Path) -> None:
    outcome = run(model_type, task, tmp_path)
    SWEPT.append(outcome)
    _check(outcome)


@pytest.mark.sweep
def test_every_architecture_table() -> None:
    """After the sweep (it runs last in this file): counts per task and outcome, then each case that is not
    ``exact``; and no allowed refusal that no longer happens."""
    if len(SWEPT) < len(CASES):
        pytest.skip("the table needs the whole sweep (pytest -m sweep)")
    counts = Counter((o.task, o.kind) for o in SWEPT)
    print("\nmerges per task and outcome (transformers", _version("transformers"), "peft", _version("peft") + ")")
    kinds = ("exact", "correct", "refused", "wrong", "crash", "no-model", "no-peft")
    print(f"{'task':20s}" + "".join(f"{k:>10s}" for k in kinds))
    for task in TASKS:
        print(f"{task:20s}" + "".join(f"{counts[(task, k)]:10d}" for k in kinds))
    for o in SWEPT:
        if o.kind != "exact":
            print(f"{o.kind:8s} {o.id}: {o.detail}")
    unused = set(REFUSED) - {o.id for o in SWEPT if o.kind == "refused"}
    assert not unused, f"REFUSED lists cases that are no longer refused: {sorted(unused)}"


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)
