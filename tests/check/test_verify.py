"""``loraship verify``: passes on correct merges; fails, naming the check, on broken ones; bad input
exits 1 with a message that says it could not verify."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import BERT, GPT2, LLAMA, LLAMA_TIED, RESNET, peft_reference
from safetensors.torch import load_file, save_file

from loraship.check.verify import verify
from loraship.cli import main
from loraship.engine.merge import merge
from loraship.tiny import build_adapter, save_tokenizer

FAST = ["--generation-tokens", "8"]


def run_verify(capsys: pytest.CaptureFixture[str], *args: str | Path, loud: bool = False) -> tuple[int, str, str]:
    """``loraship verify`` with ``args``; ``--quiet`` (stderr holds only the error) unless ``loud``
    (``--progress``: stderr is not a terminal here)."""
    code = main(["verify", *map(str, args), "--progress" if loud else "--quiet"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def edit_weights(folder: Path, fn) -> None:  # type: ignore[no-untyped-def]
    """Change the tensors of a single-file model folder in place."""
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    fn(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


@pytest.fixture
def llama_case(model_cache, tmp_path: Path) -> tuple[Path, Path, Path]:
    base = model_cache(LLAMA, tokenizer=True)
    adapter = build_adapter(base, tmp_path / "adapter", target_modules=["q_proj", "v_proj", "down_proj"],
                            use_rslora=True, r=4, lora_alpha=8)  # fmt: skip
    merged = tmp_path / "merged"
    merge(base, adapter, merged, progress=False)
    return base, adapter, merged


# --------------------------------------------------------------------------- passing


@pytest.mark.parametrize(
    ("config", "model_class", "lora", "dtype"),
    [
        (LLAMA, "AutoModelForCausalLM", {"target_modules": ["q_proj", "v_proj"]}, "float32"),
        (LLAMA, "AutoModelForCausalLM", {"target_modules": ["q_proj", "up_proj"], "use_dora": True}, "bfloat16"),
        (GPT2, "AutoModelForCausalLM", {"target_modules": ["c_attn"], "fan_in_fan_out": True}, "float16"),
        (LLAMA_TIED, "AutoModelForCausalLM", {"target_modules": ["embed_tokens", "q_proj"]}, "float32"),
        (BERT, "AutoModelForSequenceClassification", {"target_modules": ["query"], "task_type": "SEQ_CLS"}, "float32"),
        (RESNET, "AutoModelForImageClassification", {"target_modules": ["convolution"]}, "float32"),
    ],
    ids=["llama-fp32", "llama-dora-bf16", "gpt2-fp16", "llama-tied-embedding-lora", "bert-seq-cls", "resnet"],
)
def test_correct_merges_pass(model_cache, tmp_path: Path, config, model_class, lora, dtype) -> None:
    base = model_cache(config, model_class=model_class, dtype=dtype)
    adapter = build_adapter(base, tmp_path / "adapter", model_class=model_class, **lora)
    merge(base, adapter, tmp_path / "merged", progress=False)
    report = verify(base, adapter, tmp_path / "merged", threshold_overrides={"generation_tokens": 8})
    assert report.passed, report.failed_checks
    assert report.weights.exact == report.weights.changed > 0
    assert report.outputs is not None and report.outputs.stats.positions > 0
    assert [c.name for c in report.checks if c.level == "weights"] == [
        "tensor names, shapes, dtypes", "adapter tensors applied", "changed tensors recomputed", "untouched tensors",
        "adapter changes present", "finite values", "readable by the safetensors library",
        "names and tying (transformers + PEFT)",
    ]  # fmt: skip
    assert next(c for c in report.checks if c.name.startswith("names and tying")).passed is True


def test_cli_passes_and_writes_both_reports(llama_case, tmp_path: Path, capsys) -> None:
    base, adapter, merged = llama_case
    report_json, report_md = tmp_path / "report.json", tmp_path / "report.md"
    code, out, err = run_verify(capsys, "--base", base, "--adapter", adapter, "--merged", merged, "--report",
                                report_json, "--markdown", report_md, *FAST)  # fmt: skip
    assert code == 0, err
    assert out.endswith("Verification passed.\n")
    data = json.loads(report_json.read_text())
    assert data["passed"] is True and data["failed_checks"] == []
    assert (data["base"], data["adapter"], data["merged"]) == (str(base), str(adapter), str(merged))
    assert data["weights"]["exact"] == data["weights"]["changed"] == 6
    assert data["outputs"]["thresholds"] == {
        "max_error_ratio": 0.01, "min_top1": 0.95, "generation_tokens": 8, "tie_fraction": 0.01,
    }  # fmt: skip
    assert set(data["outputs"]["stats"]) == {"positions", "max_abs", "mean_abs", "mean_kl", "max_kl", "top1"}
    assert data["outputs"]["inputs"] == "the default prompts with the chat template"
    checks = {c["name"]: c for c in data["checks"]}
    assert checks["merge error / adapter effect"]["passed"] is True
    assert checks["greedy generation"]["measured"] == "5 of 5 prompts identical for 8 tokens"
    markdown = report_md.read_text()
    assert markdown.startswith("### loraship verification: passed\n\n| level | check | result | measured | required |")
    assert "| weights | changed tensors recomputed | ✅ pass | 6 of 6 bit-identical | bit-identical |" in markdown


@pytest.mark.slow
def test_cli_shows_progress_on_stderr_and_quiet_silences_it(llama_case, capsys) -> None:
    base, adapter, merged = llama_case
    code, out, err = run_verify(capsys, "--base", base, "--adapter", adapter, "--merged", merged, *FAST, loud=True)
    assert code == 0 and out.endswith("Verification passed.\n")
    for shown in ("Checking weights", "Loading the base with the adapter (PEFT, unmerged) on cpu in float32",
                  "Base + adapter outputs", "Loading the merged model (plain transformers) on cpu in float32",
                  "Merged outputs"):  # fmt: skip
        assert shown in err, shown
    code, out, err = run_verify(capsys, "--base", base, "--adapter", adapter, "--merged", merged, *FAST)
    assert (code, err) == (0, "") and out.endswith("Verification passed.\n")


def test_weights_only_and_dtype_conversion(model_cache, tmp_path: Path, capsys) -> None:
    base = model_cache(LLAMA)
    adapter = build_adapter(base, tmp_path / "adapter", target_modules=["q_proj"])
    main(["merge", "--base", str(base), "--adapter", str(adapter), "--output", str(tmp_path / "m"), "--dtype",
          "bfloat16", "--quiet"])  # fmt: skip
    code, out, _ = run_verify(
        capsys, "--base", base, "--adapter", adapter, "--merged", tmp_path / "m", "--weights-only"
    )
    assert code == 0
    assert "outputs" not in out.split("Verification")[0].replace("Outputs", "")
    report = verify(base, adapter, tmp_path / "m", outputs=False)
    assert report.weights.dtype == "bfloat16" and report.passed


def test_prompts_file_and_token_ids_without_tokenizer(model_cache, tmp_path: Path) -> None:
    from loraship.check.outputs import load_prompts

    base = model_cache(LLAMA)  # no tokenizer: fixed random token ids
    adapter = build_adapter(base, tmp_path / "adapter", target_modules=["v_proj"])
    merge(base, adapter, tmp_path / "merged", progress=False)
    report = verify(base, adapter, tmp_path / "merged", threshold_overrides={"generation_tokens": 4})
    assert report.passed and report.outputs is not None
    assert report.outputs.inputs == "fixed random token ids (the model has no tokenizer)"
    (tmp_path / "p.jsonl").write_text('{"prompt": "w1 w2"}\n{"messages": [{"role": "user", "content": "w3"}]}\n"w4"\n')
    assert load_prompts(tmp_path / "p.jsonl") == ["w1 w2", [{"role": "user", "content": "w3"}], "w4"]
    (tmp_path / "p.json").write_text('["a", "b"]')
    assert load_prompts(tmp_path / "p.json") == ["a", "b"]
    (tmp_path / "p.txt").write_text("first prompt\n\nsecond prompt\n")
    assert load_prompts(tmp_path / "p.txt") == ["first prompt", "second prompt"]


def test_user_prompts_are_used(model_cache, tmp_path: Path) -> None:
    base = tmp_path / "base"
    shutil.copytree(model_cache(LLAMA), base)
    save_tokenizer(base, 64)
    adapter = build_adapter(base, tmp_path / "adapter", target_modules=["q_proj"])
    merge(base, adapter, tmp_path / "merged", progress=False)
    report = verify(base, adapter, tmp_path / "merged", prompts=["w1 w2 w3", "w4"],
                    threshold_overrides={"generation_tokens": 4})  # fmt: skip
    assert report.passed and report.outputs is not None
    assert (report.outputs.prompts, report.outputs.inputs) == (2, "your prompts with the chat template")


# --------------------------------------------------------------------------- failing


def failed(report) -> list[str]:  # type: ignore[no-untyped-def]
    return report.failed_checks


def test_one_tensor_slightly_perturbed(llama_case) -> None:
    base, adapter, merged = llama_case
    name = "model.layers.1.self_attn.q_proj.weight"
    edit_weights(merged, lambda t: t[name].add_(1e-3 * torch.randn_like(t[name])))
    report = verify(base, adapter, merged, threshold_overrides={"generation_tokens": 4})
    assert "weights: changed tensors recomputed" in failed(report)
    (check,) = [c for c in report.checks if c.name == "changed tensors recomputed"]
    assert check.detail.startswith(f"{name} (max |Δ| ")
    assert check.measured.startswith("5 of 6 bit-identical; max |Δ| ")


@pytest.mark.slow
def test_base_copied_as_merged_is_a_no_op(llama_case, capsys) -> None:
    base, adapter, merged = llama_case
    shutil.rmtree(merged)
    shutil.copytree(base, merged)
    code, out, err = run_verify(capsys, "--base", base, "--adapter", adapter, "--merged", merged, *FAST)
    assert code == 1
    assert re.search(r"adapter changes present +FAIL +0 of 6 changed tensors", out)  # the row, wrapped to 100
    rows = [line for line in out.splitlines() if line.startswith(("level ", "weights ", "outputs ", "      "))]
    assert "no-op merge)" in out and max(map(len, rows)) <= 100
    assert err == (
        "Error: The merged model does not match base + adapter: weights: changed tensors recomputed; weights: "
        "adapter changes present; outputs: merge error / adapter effect; outputs: top-1 agreement; outputs: greedy "
        "generation.\n"
        "Fix: Do not publish it. Merge again with `loraship merge` (and check that the adapter and base are the ones "
        "it was trained with); the report says which tensors or outputs differ.\n"
    )


@pytest.mark.parametrize("broken", ["rslora-ignored", "delta-twice"])
def test_wrong_scale_and_double_delta_fail_weights_and_outputs(llama_case, tmp_path: Path, broken: str) -> None:
    base, adapter, merged = llama_case
    bad = tmp_path / "bad"
    if broken == "rslora-ignored":
        ignored = tmp_path / "ignored"
        shutil.copytree(adapter, ignored)
        config = json.loads((ignored / "adapter_config.json").read_text())
        (ignored / "adapter_config.json").write_text(json.dumps({**config, "use_rslora": False}))
        merge(base, ignored, bad, progress=False)
    else:
        merge(merged, adapter, bad, progress=False)
    report = verify(base, adapter, bad, threshold_overrides={"generation_tokens": 4})
    assert "weights: changed tensors recomputed" in failed(report)
    assert "outputs: merge error / adapter effect" in failed(report)


def test_library_check_reports_what_the_safetensors_library_reads(llama_case) -> None:
    from dataclasses import replace

    from loraship.check.verify import library_check
    from loraship.engine.safetensors_io import read_checkpoint, weight_files

    _, _, merged = llama_case
    files = weight_files(merged)
    assert files is not None
    ckpt = read_checkpoint(merged, files)
    check = library_check(ckpt)
    assert (check.passed, check.measured) == (True, f"{len(files)} of {len(files)} files open")
    name = "model.norm.weight"
    wrong = {**ckpt.tensors, name: replace(ckpt.tensors[name], shape=(-1,))}
    check = library_check(replace(ckpt, tensors=wrong))
    assert (check.passed, check.detail) == (False, f"{ckpt.tensors[name].file.name}: `{name}` reads as "
                                                   f"{list(ckpt.tensors[name].shape)}")  # fmt: skip


def test_untouched_tensor_changed_and_nan(llama_case) -> None:
    base, adapter, merged = llama_case

    def damage(t):  # type: ignore[no-untyped-def]
        t["model.norm.weight"][0] += 1.0
        t["model.layers.0.self_attn.v_proj.weight"][0, 0] = float("nan")

    edit_weights(merged, damage)
    report = verify(base, adapter, merged, outputs=False)
    assert failed(report) == [
        "weights: changed tensors recomputed",
        "weights: untouched tensors",
        "weights: finite values",
    ]
    checks = {c.name: c for c in report.checks}
    assert checks["untouched tensors"].detail == "model.norm.weight"
    assert checks["finite values"].detail == "model.layers.0.self_attn.v_proj.weight"


def test_missing_and_extra_tensors(llama_case) -> None:
    base, adapter, merged = llama_case

    def reshape(t):  # type: ignore[no-untyped-def]
        t["lm_head.extra"] = torch.zeros(2)
        del t["model.norm.weight"]

    edit_weights(merged, reshape)
    report = verify(base, adapter, merged, outputs=False)
    assert failed(report) == ["weights: tensor names, shapes, dtypes"]
    (check,) = [c for c in report.checks if not c.passed and c.passed is not None]
    assert check.measured == "20 of 21 as planned; 1 missing, 1 extra, 0 different"
    assert check.detail == "model.norm.weight, lm_head.extra"


def test_peft_merge_of_a_tied_model_fails_verification(model_cache, tmp_path: Path) -> None:
    """PEFT's merge_and_unload folds an embedding LoRA into the tied lm_head too: verify catches it."""
    base = model_cache(LLAMA_TIED)
    adapter = build_adapter(base, tmp_path / "adapter", target_modules=["embed_tokens"])
    peft_reference(base, adapter, tmp_path / "peft-merged")
    report = verify(base, adapter, tmp_path / "peft-merged", threshold_overrides={"generation_tokens": 4})
    assert "weights: tensor names, shapes, dtypes" in failed(report)  # lm_head.weight missing: still tied
    assert "outputs: merge error / adapter effect" in failed(report)


# --------------------------------------------------------------------------- could not verify: exit 1, said so


def test_merged_folder_missing(llama_case, tmp_path: Path, capsys) -> None:
    base, adapter, _ = llama_case
    code, _, err = run_verify(capsys, "--base", base, "--adapter", adapter, "--merged", tmp_path / "nope")
    assert code == 1
    assert err == (
        f"Error: The merged folder `{tmp_path / 'nope'}` does not exist.\n"
        "Fix: Pass --merged the folder `loraship merge --output` wrote.\n"
    )


def test_merged_folder_without_weights(llama_case, capsys) -> None:
    base, adapter, merged = llama_case
    (merged / "model.safetensors").unlink()
    code, _, err = run_verify(capsys, "--base", base, "--adapter", adapter, "--merged", merged)
    assert code == 1
    assert err == (
        f"Error: The merged folder `{merged}` is incomplete: it has no model.safetensors and no "
        "model.safetensors.index.json.\n"
        "Fix: Merge again (`loraship merge ... --overwrite`) or download the complete folder.\n"
    )


def test_merged_folder_without_config(llama_case, capsys) -> None:
    base, adapter, merged = llama_case
    (merged / "config.json").unlink()
    code, _, err = run_verify(capsys, "--base", base, "--adapter", adapter, "--merged", merged)
    assert code == 1
    assert err.startswith(f"Error: The merged folder `{merged}` is incomplete: it has no config.json.\n")


def test_merged_folder_missing_a_shard(model_cache, tmp_path: Path, capsys) -> None:
    base = model_cache(LLAMA)
    adapter = build_adapter(base, tmp_path / "adapter", target_modules=["q_proj"])
    merge(base, adapter, tmp_path / "merged", max_shard_size="10KB", progress=False)
    (tmp_path / "merged" / "model-00002-of-00003.safetensors").unlink()
    code, _, err = run_verify(capsys, "--base", base, "--adapter", adapter, "--merged", tmp_path / "merged")
    assert code == 1
    assert err == (
        f"Error: The merged folder `{tmp_path / 'merged'}` is incomplete: `{tmp_path / 'merged'}/"
        f"model.safetensors.index.json` lists 1 weight file(s) missing from `{tmp_path / 'merged'}`: "
        "model-00002-of-00003.safetensors.\n"
        "Fix: Merge again (`loraship merge ... --overwrite`) or download the complete folder.\n"
    )


def test_adapter_does_not_fit_base(llama_case, model_cache, tmp_path: Path, capsys) -> None:
    _, adapter, merged = llama_case
    gpt2 = model_cache(GPT2)
    code, _, err = run_verify(capsys, "--base", gpt2, "--adapter", adapter, "--merged", merged)
    assert code == 1
    assert err.startswith("Error: None of the 6 modules the adapter changes exist in the base model")


@pytest.mark.parametrize("content", [None, "", "\n\n"], ids=["unreadable", "empty", "blank"])
def test_bad_prompts_file(llama_case, tmp_path: Path, capsys, content) -> None:
    base, adapter, merged = llama_case
    prompts = tmp_path / "prompts.txt"
    if content is None:
        prompts.mkdir()
    else:
        prompts.write_text(content)
    code, _, err = run_verify(capsys, "--base", base, "--adapter", adapter, "--merged", merged, "--prompts", prompts)
    assert code == 1
    if content is None:
        assert err == (
            f"Error: Cannot read the prompts file `{prompts}`: Is a directory.\n"
            "Fix: Pass --prompts a readable file with one prompt per line (or JSON / JSONL).\n"
        )
    else:
        assert err == (
            f"Error: The prompts file `{prompts}` holds no prompts.\n"
            "Fix: Write at least one prompt in it, or leave out --prompts to use the default prompts.\n"
        )


def test_model_class_needing_remote_code(llama_case, capsys) -> None:
    base, adapter, merged = llama_case
    config = json.loads((merged / "config.json").read_text())
    config["architectures"] = ["MyCustomForCausalLM"]
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.MyCustomForCausalLM"}
    (merged / "config.json").write_text(json.dumps(config))
    code, _, err = run_verify(capsys, "--base", base, "--adapter", adapter, "--merged", merged)
    assert code == 1
    assert err == (
        f"Error: transformers cannot load the model class MyCustomForCausalLM of `{merged}` without running code "
        "from the model repo.\n"
        "Fix: If you trust the base model's repository, pass --trust-remote-code: transformers then imports and "
        "runs the Python files the repo ships (auto_map in config.json), with your permissions.\n"
    )


def test_tokenizer_needing_remote_code_is_a_clear_error(llama_case) -> None:
    from loraship.errors import InputError

    base, adapter, merged = llama_case
    (merged / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": ["tok.MyTok", None]}}))
    with pytest.raises(InputError) as info:
        verify(base, adapter, merged, threshold_overrides={"generation_tokens": 2})
    assert info.value.message == (
        f"The tokenizer in `{merged}` is defined by Python code in the repo (auto_map in tokenizer_config.json), and "
        "running it was not allowed."
    )
    assert info.value.fix == (
        "If you trust the repo, pass --trust-remote-code (`trust_remote_code: true` in loraship.yaml); otherwise "
        "verify with --weights-only."
    )


def test_exact_weights_failing_a_bf16_output_check_say_it_is_rounding(model_cache, tmp_path: Path, capsys) -> None:
    """An exact merge must not be told to "merge again" when only the half-precision outputs differ."""
    base = model_cache(LLAMA)
    adapter = build_adapter(base, tmp_path / "adapter", target_modules=["q_proj"])
    main(["merge", "--base", str(base), "--adapter", str(adapter), "--output", str(tmp_path / "m"), "--dtype",
          "bfloat16", "--quiet"])  # fmt: skip
    code, _, err = run_verify(  # a zero error budget: bf16 rounding alone fails it
        capsys, "--base", base, "--adapter", adapter, "--merged", tmp_path / "m", "--max-error-ratio", "0",
        "--generation-tokens", "2",
    )  # fmt: skip
    assert code == 1
    assert err.startswith(
        "Error: The merged weights are exact (every changed tensor bit-identical to base + adapter), but the output "
        "check in bfloat16 failed: outputs: merge error / adapter effect"
    )
    assert "The difference is bfloat16 rounding in the check (the larger the adapter's effect, the larger it is), not "\
           "a wrong merge.\n" in err  # fmt: skip
    assert err.endswith(
        "Fix: Run the output check in float32 (`--dtype float32`; in loraship.yaml `verify: {dtype: float32}`), or "
        "relax its thresholds for this adapter (`--max-error-ratio`, `--min-top1`).\n"
    )


# --------------------------------------------------------------------------- bounded memory

DEEP = {**LLAMA, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2}  # fmt: skip  # ~0.6 MB in float32: most layers stay on disk under 100 KB


def test_output_check_with_max_memory_reads_layers_from_disk_and_measures_the_same(
    model_cache, tmp_path: Path, monkeypatch
) -> None:
    import loraship.check.outputs as output_check

    base = model_cache(DEEP, max_shard_size="100KB", tokenizer=True)
    adapter = build_adapter(base, tmp_path / "adapter", target_modules=["q_proj", "v_proj", "down_proj"])
    merged = tmp_path / "merged"
    merge(base, adapter, merged, progress=False, max_shard_size="100KB")
    placed: list[set[str]] = []
    real = output_check._peft_offloaded

    def spy(model, adapter_dir):  # type: ignore[no-untyped-def]
        placed.append(set(model.hf_device_map.values()))
        return real(model, adapter_dir)

    monkeypatch.setattr(output_check, "_peft_offloaded", spy)
    fast = {"generation_tokens": 4}
    bounded = verify(base, adapter, merged, device="cpu", threshold_overrides=fast, max_memory=100_000)
    whole = verify(base, adapter, merged, device="cpu", threshold_overrides=fast)
    assert bounded.passed and whole.passed
    assert placed and "disk" in placed[0]  # the reference's layers really stayed on disk
    assert bounded.outputs is not None and whole.outputs is not None
    assert bounded.outputs.stats == whole.outputs.stats  # the same forward passes, bit for bit, on CPU in float32
    assert bounded.outputs.generation == whole.outputs.generation
    assert (
        "Both models ran with at most 100.0 KB of weights in memory (max_memory); the other layers were read from "
        "their safetensors files as they ran (accelerate's disk offload)." in bounded.notes
    )


def test_max_memory_refuses_an_adapter_peft_builds_from_base_weights(model_cache, tmp_path: Path, capsys) -> None:
    base = model_cache(LLAMA, tokenizer=True)
    adapter = build_adapter(base, tmp_path / "adapter", target_modules=["q_proj"], use_dora=True)
    merged = tmp_path / "merged"
    merge(base, adapter, merged, progress=False)
    code, _, err = run_verify(capsys, "--base", base, "--adapter", adapter, "--merged", merged, "--max-memory", "1MB")
    assert code == 1
    assert err == (
        "Error: The bounded-memory output check (max_memory) runs plain LoRA adapters; this one uses DoRA (use_dora), "
        "whose PEFT modules are built from base weights that stay on disk there.\n"
        "Fix: Run the output check without `max_memory` on a machine whose memory holds one model, or check the "
        "weights only (`verify: {outputs: false}`, `loraship verify --weights-only`: every merged tensor is still "
        "compared bit for bit with base + adapter).\n"
    )


def test_an_adapter_holding_nan_is_refused_as_the_adapter_s_fault(model_cache, tmp_path: Path, capsys) -> None:
    """NaN in the adapter's own weights: merging again would not help; NaN only in the merged file: it would."""
    base = model_cache(LLAMA, tokenizer=True)
    adapter = build_adapter(base, tmp_path / "adapter", target_modules=["q_proj", "v_proj"])
    name = "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"
    path = adapter / "adapter_model.safetensors"
    tensors = load_file(str(path))
    tensors[name][0, 0] = float("inf")
    tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"][0, 0] = float("nan")
    save_file(tensors, str(path), metadata={"format": "pt"})
    merged = tmp_path / "merged"
    merge(base, adapter, merged, progress=False)
    code, out, err = run_verify(capsys, "--base", base, "--adapter", adapter, "--merged", merged, "--weights-only")
    assert code == 1 and re.search(r"finite values +FAIL", out)
    assert err == (
        f"Error: The adapter holds non-finite values (NaN or Inf) in `{name}` (and 1 more), so the merged model "
        "does too: the adapter itself is broken, not the merge.\n"
        "Fix: Retrain the adapter (its training diverged: check the loss for NaN, lower the learning rate) or export "
        "it again from a good checkpoint; merging this adapter again gives the same result.\n"
    )


def test_nan_only_in_the_merged_file_still_says_merge_again(llama_case, capsys) -> None:
    base, adapter, merged = llama_case

    def damage(t):  # type: ignore[no-untyped-def]
        t["model.layers.0.self_attn.v_proj.weight"][0, 0] = float("nan")

    edit_weights(merged, damage)
    code, _, err = run_verify(capsys, "--base", base, "--adapter", adapter, "--merged", merged, "--weights-only")
    assert code == 1
    assert err == (
        "Error: The merged model does not match base + adapter: weights: changed tensors recomputed; weights: finite "
        "values.\n"
        "Fix: Do not publish it. Merge again with `loraship merge` (and check that the adapter and base are the ones "
        "it was trained with); the report says which tensors or outputs differ.\n"
    )
