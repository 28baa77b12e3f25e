"""The independent check of names and tying (transformers + PEFT on the meta device), PEFT's own
load-time validation, and the adapter-folder refusals that used to be wrong or unclear."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import LLAMA
from test_families import T5
from test_merge_errors import assert_nothing_written, run_merge

from loraship.check.verify import verify
from loraship.engine import merge as merge_module
from loraship.engine import planner
from loraship.engine.merge import merge
from loraship.engine.oracle import OracleReport
from loraship.engine.planning.state import PlanState
from loraship.tiny import build_adapter, build_model

Q0, Q1 = "model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight"


@pytest.fixture
def llama(model_cache) -> Path:
    return model_cache(LLAMA)


def _edit_config(adapter: Path, **changes: object) -> None:
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, **changes}))


def test_a_plan_that_swaps_two_targets_fails_verify_weights_only(llama: Path, tmp_path: Path, monkeypatch) -> None:
    """A planning mistake must not check itself: the weights recomputed with the same (broken) plan
    match, but the names check against transformers + PEFT does not."""
    adapter = build_adapter(llama, tmp_path / "adapter", target_modules=["q_proj"])
    place = planner.place

    def swapped(self: PlanState) -> None:
        place(self)
        a, b = self.targets[Q0], self.targets[Q1]
        a.steps, b.steps = b.steps, a.steps
        for key, name in list(self.accounting.items()):
            self.accounting[key] = {Q0: Q1, Q1: Q0}.get(name, name)

    monkeypatch.setattr(planner, "place", swapped)
    with pytest.raises(Exception) as refused:  # merge itself refuses the broken plan
        merge(llama, adapter, tmp_path / "refused", progress=False)
    assert "disagrees with transformers + PEFT" in str(refused.value)
    assert_nothing_written(tmp_path / "refused")

    monkeypatch.setattr(merge_module, "check_plan", lambda *a, **k: OracleReport(0, ()))  # let it through
    merge(llama, adapter, tmp_path / "merged", progress=False)
    monkeypatch.undo()
    monkeypatch.setattr(planner, "place", swapped)
    report = verify(llama, adapter, tmp_path / "merged", outputs=False)
    recomputed = next(c for c in report.checks if c.name == "changed tensors recomputed")
    names = next(c for c in report.checks if c.name == "names and tying (transformers + PEFT)")
    assert recomputed.passed is True  # the same plan recomputes the same (wrong) tensors
    assert names.passed is False
    assert names.measured == "4 disagreement(s) with transformers + PEFT"
    assert names.detail.startswith(
        "`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` changes "
        f"`model.layers.0.self_attn.q_proj.weight`: transformers + PEFT put it in `{Q0}`, the plan in `{Q1}`"
    )
    assert not report.passed


def test_weights_that_do_not_fit_r_are_refused_as_peft_does(llama: Path, tmp_path: Path, capsys) -> None:
    adapter = build_adapter(llama, tmp_path / "adapter", target_modules=["q_proj"], r=4)
    _edit_config(adapter, r=8)
    out = tmp_path / "out"
    code, err = run_merge(capsys, "--base", llama, "--adapter", adapter, "--output", out)
    assert code == 1
    assert err == (
        f"Error: `{adapter}` does not fit its own adapter_config.json (PEFT refuses to load it): "
        "`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` is [4, 16], PEFT expects [8, 16]; "
        "`base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight` is [16, 4], PEFT expects [16, 8]; "
        "`base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight` is [4, 16], PEFT expects [8, 16]; "
        "`base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight` is [16, 4], PEFT expects [16, 8].\n"
        "Fix: Restore adapter_config.json as PEFT saved it with these weights (r, rank_pattern, target_modules).\n"
    )
    assert_nothing_written(out)


def test_options_peft_rejects_are_refused(llama: Path, tmp_path: Path, capsys) -> None:
    adapter = build_adapter(llama, tmp_path / "adapter", target_modules=["q_proj"], use_dora=True)
    _edit_config(adapter, lora_bias=True)
    out = tmp_path / "out"
    code, err = run_merge(capsys, "--base", llama, "--adapter", adapter, "--output", out)
    assert code == 1
    assert err == (
        f"Error: PEFT refuses the configuration of `{adapter}`: The argument lora_bias=True is not supported for "
        "DoRA, please pass use_dora=False\n"
        "Fix: PEFT cannot load this adapter either: save it again with a configuration PEFT accepts.\n"
    )
    assert_nothing_written(out)


def test_converted_lora_ga_adapters_merge_and_unconverted_ones_are_refused(llama: Path, tmp_path: Path, capsys) -> None:
    adapter = build_adapter(llama, tmp_path / "adapter", target_modules=["q_proj"])
    _edit_config(adapter, init_lora_weights=True, lora_ga_config={})  # as PEFT saves a converted adapter
    code, _ = run_merge(capsys, "--base", llama, "--adapter", adapter, "--output", tmp_path / "converted")
    assert code == 0
    _edit_config(adapter, init_lora_weights="lora_ga")
    code, err = run_merge(capsys, "--base", llama, "--adapter", adapter, "--output", tmp_path / "raw")
    assert code == 1
    assert err.startswith(
        f"Error: `{adapter / 'adapter_config.json'}` was initialised with LoRA-GA, which rewrites the base weights"
    )


def test_an_adapter_in_a_named_subfolder_is_named(llama: Path, tmp_path: Path, capsys) -> None:
    saved = build_adapter(llama, tmp_path / "saved", target_modules=["q_proj"])
    folder = tmp_path / "adapters"
    shutil.copytree(saved, folder / "my-task")  # save_pretrained() of an adapter named "my-task"
    code, err = run_merge(capsys, "--base", llama, "--adapter", folder, "--output", tmp_path / "out")
    assert code == 1
    assert err == (
        f"Error: `{folder}` has no adapter_config.json, but its subfolder(s) `my-task` hold a PEFT adapter "
        "(save_pretrained() writes an adapter that is not named `default` into a subfolder of its name).\n"
        f"Fix: Point --adapter at the adapter's own folder, e.g. `{folder / 'my-task'}`.\n"
    )


def test_full_verify_of_an_encoder_decoder(tmp_path: Path) -> None:
    """Output-level verification gives encoder-decoders decoder inputs (it used to crash on T5)."""
    base = build_model(tmp_path / "base", T5, model_class="T5ForConditionalGeneration")
    adapter = build_adapter(base, tmp_path / "adapter", model_class="T5ForConditionalGeneration",
                            target_modules=["q", "v", "lm_head"])  # fmt: skip
    merge(base, adapter, tmp_path / "merged", progress=False)
    report = verify(base, adapter, tmp_path / "merged", device="cpu")
    assert report.passed, report.failed_checks
    assert report.outputs is not None and "with a fixed decoder prefix" in report.outputs.inputs
