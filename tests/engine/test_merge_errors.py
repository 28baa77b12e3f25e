"""Bad input to ``loraship merge``: a clear message (what, where, how to fix), exit code 1, nothing written.

Messages are asserted word for word: they are the product's interface when something is wrong.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import GPT2, LLAMA

from loraship.cli import main
from loraship.tiny import build_adapter


def run_merge(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str]:
    code = main(["merge", *map(str, args), "--quiet"])
    return code, capsys.readouterr().err


def assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]
    assert leftovers == []


@pytest.fixture
def llama(model_cache) -> Path:
    return model_cache(LLAMA)


@pytest.fixture
def llama_adapter(llama: Path, tmp_path: Path) -> Path:
    return build_adapter(llama, tmp_path / "adapter", target_modules=["q_proj", "v_proj"])


def test_missing_adapter_config(llama: Path, llama_adapter: Path, tmp_path: Path, capsys) -> None:
    (llama_adapter / "adapter_config.json").unlink()
    out = tmp_path / "out"
    code, err = run_merge(capsys, "--base", llama, "--adapter", llama_adapter, "--output", out)
    assert code == 1
    assert err == (
        f"Error: `{llama_adapter}` has no adapter_config.json: it is not a PEFT adapter folder.\n"
        "Fix: Point --adapter at the folder PeftModel.save_pretrained() wrote: it holds adapter_config.json and "
        "adapter_model.safetensors.\n"
    )
    assert_nothing_written(out)


def test_full_model_given_as_adapter(llama: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    code, err = run_merge(capsys, "--base", llama, "--adapter", llama, "--output", out)
    assert code == 1
    assert err.startswith(
        f"Error: `{llama}` has no adapter_config.json: it is not a PEFT adapter folder (it holds a config.json: "
        "is it a full model rather than an adapter?).\n"
    )


def _pickle_adapter(adapter: Path) -> None:
    from safetensors.torch import load_file

    state = load_file(str(adapter / "adapter_model.safetensors"))
    torch.save(state, adapter / "adapter_model.bin")
    (adapter / "adapter_model.safetensors").unlink()


def test_pickled_adapter_refused_without_opt_in(llama: Path, llama_adapter: Path, tmp_path: Path, capsys) -> None:
    _pickle_adapter(llama_adapter)
    out = tmp_path / "out"
    code, err = run_merge(capsys, "--base", llama, "--adapter", llama_adapter, "--output", out)
    assert code == 1
    assert err == (
        f"Error: `{llama_adapter}` holds its adapter weights only as a pickled adapter_model.bin. Loading a pickle "
        "can run arbitrary code, so loraship refuses it by default.\n"
        "Fix: If you trust this adapter, pass --allow-pickle (it is then loaded with "
        "torch.load(weights_only=True)); or convert it once with PEFT: "
        "PeftModel.from_pretrained(base, adapter).save_pretrained(out_dir) writes safetensors.\n"
    )
    assert_nothing_written(out)


def test_pickled_adapter_merges_with_opt_in(llama: Path, llama_adapter: Path, tmp_path: Path, capsys) -> None:
    main(["merge", "--base", str(llama), "--adapter", str(llama_adapter), "--output", str(tmp_path / "ref"), "--quiet"])
    _pickle_adapter(llama_adapter)
    code, _ = run_merge(
        capsys, "--base", llama, "--adapter", llama_adapter, "--output", tmp_path / "out", "--allow-pickle"
    )
    assert code == 0
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (
        tmp_path / "ref" / "model.safetensors"
    ).read_bytes()


def test_pickled_adapter_with_code_is_refused_even_with_opt_in(llama: Path, llama_adapter: Path, tmp_path: Path,
                                                               capsys) -> None:  # fmt: skip
    (llama_adapter / "adapter_model.safetensors").unlink()
    torch.save({"weights": object.__new__(_Evil)}, llama_adapter / "adapter_model.bin")
    out = tmp_path / "out"
    code, err = run_merge(capsys, "--base", llama, "--adapter", llama_adapter, "--output", out, "--allow-pickle")
    assert code == 1
    assert err.startswith(
        f"Error: `{llama_adapter / 'adapter_model.bin'}` could not be loaded with torch.load(weights_only=True): "
    )
    assert "Fix: The file holds more than tensors (or is corrupt)" in err
    assert_nothing_written(out)


class _Evil:
    pass


def test_adapter_tensors_matching_nothing_are_listed(model_cache, tmp_path: Path, capsys) -> None:
    deeper = model_cache({**LLAMA, "num_hidden_layers": 3})
    adapter = build_adapter(deeper, tmp_path / "adapter", target_modules=["q_proj"])
    base = model_cache(LLAMA)
    out = tmp_path / "out"
    code, err = run_merge(capsys, "--base", base, "--adapter", adapter, "--output", out)
    assert code == 1
    assert err == (
        f"Error: 2 adapter tensor(s) match no tensor of the base model `{base}`: "
        "`base_model.model.model.layers.2.self_attn.q_proj.lora_A.weight`, "
        "`base_model.model.model.layers.2.self_attn.q_proj.lora_B.weight`.\n"
        f"Fix: Use the base model the adapter was trained on (adapter_config.json names `{deeper}`); merging "
        "without these tensors would silently drop part of the adapter.\n"
    )
    assert_nothing_written(out)


def test_shape_mismatch_names_tensor_and_shapes(model_cache, tmp_path: Path, capsys) -> None:
    wider = model_cache({**LLAMA, "hidden_size": 32, "intermediate_size": 48})
    adapter = build_adapter(wider, tmp_path / "adapter", target_modules=["q_proj"])
    base = model_cache(LLAMA)
    out = tmp_path / "out"
    code, err = run_merge(capsys, "--base", base, "--adapter", adapter, "--output", out)
    assert code == 1
    assert err == (
        "Error: Shape mismatch for `model.layers.0.self_attn.q_proj.weight`: the base tensor is [16, 16] but the "
        "adapter's lora_B [32, 4] @ lora_A [4, 32] makes [32, 32].\n"
        f"Fix: Use the base model the adapter was trained on (adapter_config.json names `{wider}`).\n"
    )
    assert_nothing_written(out)


def test_adapter_for_another_architecture(model_cache, tmp_path: Path, capsys) -> None:
    gpt2 = model_cache(GPT2)
    adapter = build_adapter(gpt2, tmp_path / "adapter", target_modules=["c_attn"], fan_in_fan_out=True)
    base = model_cache(LLAMA)
    out = tmp_path / "out"
    code, err = run_merge(capsys, "--base", base, "--adapter", adapter, "--output", out)
    assert code == 1
    assert err == (
        f"Error: None of the 2 modules the adapter changes exist in the base model `{base}`: the adapter was made "
        "for another architecture (the adapter was trained on `GPT2LMHeadModel`; the base is `LlamaForCausalLM`).\n"
        f"Fix: Use the base model the adapter was trained on (adapter_config.json names `{gpt2}`).\n"
    )
    assert_nothing_written(out)


@pytest.mark.parametrize(
    ("peft_type", "settings"),
    [
        ("FROD", {"target_modules": ["q_proj"], "progressbar": False}),
    ],
    ids=["frod"],
)  # fmt: skip
def test_method_not_merged_yet_is_named(peft_type: str, settings: dict, llama: Path, tmp_path: Path, capsys) -> None:
    import json

    import transformers
    from peft import get_peft_model
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    model = transformers.AutoModelForCausalLM.from_pretrained(str(llama))
    rank_pattern = settings.pop("rank_pattern", None)
    get_peft_model(model, PEFT_TYPE_TO_CONFIG_MAPPING[peft_type](**settings)).save_pretrained(str(tmp_path / "a"))
    config_path = tmp_path / "a" / "adapter_config.json"
    if rank_pattern is not None:  # as AdaLoRA's allocator saves it after training
        config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "rank_pattern": rank_pattern}))
    out = tmp_path / "out"
    code, err = run_merge(capsys, "--base", llama, "--adapter", tmp_path / "a", "--output", out)
    assert code == 1
    assert err == (
        f"Error: `{config_path}` is an {peft_type} adapter: a method PEFT can merge, but loraship does not merge yet "
        "(it merges LoRA (with rsLoRA, DoRA), AdaLoRA, BEFT, BOFT, C3A, DEFT, DeLoRA, FourierFT, GLoRA, GraLoRA, HRA, "
        "HiRA, IA3, LoHa, LoKr, MiSS, OFT, OSF, PEANuT, PSOFT, PVeRA, RandLoRA, RoAd, SHiRA, SuperTuning, TinyLoRA, "
        "UniLoRA, VB-LoRA, VeRA, WaveFT, LN tuning and trainable tokens). PEFT derives each layer's U at load from a "
        "projection it recomputes from all the category's base weights together (every q_proj stacked, say), which "
        "loraship's merge of one base tensor at a time cannot do.\n"
        "Fix: Merge it with PEFT itself: PeftModel.from_pretrained(base, adapter).merge_and_unload(), then check the "
        "result with `loraship verify`.\n"
    )
    assert_nothing_written(out)


def test_unsupported_peft_type_prompt_tuning(llama: Path, tmp_path: Path, capsys) -> None:
    import transformers
    from peft import PromptTuningConfig, get_peft_model

    model = transformers.AutoModelForCausalLM.from_pretrained(str(llama))
    get_peft_model(model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))\
        .save_pretrained(str(tmp_path / "prompt"))  # fmt: skip
    code, err = run_merge(capsys, "--base", llama, "--adapter", tmp_path / "prompt", "--output", tmp_path / "out")
    assert code == 1
    assert err == (
        f"Error: `{tmp_path / 'prompt' / 'adapter_config.json'}` is a PROMPT_TUNING adapter: it adds virtual tokens "
        "(or attention prefixes) at run time and has no weight delta that could be merged into the base model.\n"
        "Fix: Ship it as an adapter (load it with PEFT on top of the base model) instead of merging it.\n"
    )


def test_layer_replication_refused(llama: Path, tmp_path: Path, capsys) -> None:
    adapter = build_adapter(llama, tmp_path / "adapter", target_modules=["q_proj"], layer_replication=[[0, 2], [1, 2]])
    out = tmp_path / "out"
    code, err = run_merge(capsys, "--base", llama, "--adapter", adapter, "--output", out)
    assert code == 1
    assert err == (
        f"Error: `{adapter / 'adapter_config.json'}` uses layer_replication: replicated layers share base weights, "
        "so a merged checkpoint cannot hold a different delta per copy (PEFT 0.21 merges it silently and wrongly).\n"
        "Fix: Keep this adapter unmerged, or train without layer_replication.\n"
    )
    assert_nothing_written(out)


def test_base_rewriting_init_refused(llama: Path, llama_adapter: Path, tmp_path: Path, capsys) -> None:
    config = json.loads((llama_adapter / "adapter_config.json").read_text())
    (llama_adapter / "adapter_config.json").write_text(json.dumps({**config, "init_lora_weights": "pissa"}))
    code, err = run_merge(capsys, "--base", llama, "--adapter", llama_adapter, "--output", tmp_path / "out")
    assert code == 1
    assert err.startswith(
        f"Error: `{llama_adapter / 'adapter_config.json'}` was initialised with pissa, which rewrites the base "
        "weights at the start of training: the adapter only fits that rewritten base, and merging it into the "
        "original base would produce a wrong model.\n"
    )


QUANTIZED = [
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "bitsandbytes, 4-bit"),
    ({"quant_method": "bitsandbytes", "load_in_8bit": True}, "bitsandbytes, 8-bit"),
    ({"quant_method": "gptq", "bits": 4}, "gptq, 4-bit"),
    ({"quant_method": "awq", "bits": 4}, "awq, 4-bit"),
    ({"quant_method": "compressed-tensors"}, "compressed-tensors"),
]


@pytest.mark.parametrize(("quant", "described"), QUANTIZED, ids=[q[1] for q in QUANTIZED])
def test_quantized_base_refused(llama: Path, llama_adapter: Path, tmp_path: Path, capsys, quant, described) -> None:
    base = tmp_path / "quantized-base"
    shutil.copytree(llama, base)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "quantization_config": quant}))
    out = tmp_path / "out"
    code, err = run_merge(capsys, "--base", base, "--adapter", llama_adapter, "--output", out)
    assert code == 1
    assert err == (
        f"Error: The base model `{base}` is quantized ({described}; config.json has a quantization_config): "
        "merging a LoRA delta into quantized weights loses most of it.\n"
        "Fix: Merge into the full-precision model this one was quantized from (its model card usually names it): "
        "pass it with --base (in loraship.yaml: `base:`). loraship dequantizes block-scaled FP8 and MXFP4 bases "
        "itself.\n"
    )
    assert_nothing_written(out)


def test_truncated_safetensors(llama: Path, llama_adapter: Path, tmp_path: Path, capsys) -> None:
    base = tmp_path / "base"
    shutil.copytree(llama, base)
    weights = base / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-100])
    out = tmp_path / "out"
    code, err = run_merge(capsys, "--base", base, "--adapter", llama_adapter, "--output", out)
    assert code == 1
    header = int.from_bytes(data[:8], "little") + 8
    assert err == (
        f"Error: `{weights}` is truncated: its header describes {len(data) - header} bytes of tensor data but the "
        f"file holds {len(data) - 100 - header}.\n"
        "Fix: Download the file again: it was probably cut off during a download or copy (with huggingface_hub, "
        "pass force_download=True or delete it from the cache).\n"
    )
    assert_nothing_written(out)


def test_corrupt_safetensors_header(llama: Path, llama_adapter: Path, tmp_path: Path, capsys) -> None:
    base = tmp_path / "base"
    shutil.copytree(llama, base)
    weights = base / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8] = ord("X")  # the JSON header's opening brace
    weights.write_bytes(bytes(data))
    code, err = run_merge(capsys, "--base", base, "--adapter", llama_adapter, "--output", tmp_path / "out")
    assert code == 1
    assert err.startswith(f"Error: `{weights}` has a corrupt header: it is not valid JSON (")


def test_output_not_empty(llama: Path, llama_adapter: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = run_merge(capsys, "--base", llama, "--adapter", llama_adapter, "--output", out)
    assert code == 1
    assert err == (
        f"Error: The output folder `{out}` exists and is not empty.\n"
        "Fix: Pass --overwrite to replace it, or choose another --output.\n"
    )
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_not_enough_disk_space(llama: Path, llama_adapter: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    import shutil as real_shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(real_shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    out = tmp_path / "out"
    code, err = run_merge(capsys, "--base", llama, "--adapter", llama_adapter, "--output", out)
    assert code == 1
    assert err.startswith("Error: Not enough free disk space for the merged model: it needs ")
    assert err.endswith(
        f"in `{tmp_path}`, which has 1.0 KB free.\nFix: Free some space, or choose an --output on a disk with more "
        "room.\n"
    )
    assert_nothing_written(out)


def test_missing_base_folder(llama_adapter: Path, tmp_path: Path, capsys) -> None:
    code, err = run_merge(capsys, "--base", tmp_path / "nope", "--adapter", llama_adapter, "--output", tmp_path / "o")
    assert code == 1
    assert err == (
        f"Error: Base model folder `{tmp_path / 'nope'}` does not exist.\n"
        "Fix: Pass the folder save_pretrained() wrote (or a Hub repo id with `loraship run`).\n"
    )


def test_bad_max_shard_size(llama: Path, llama_adapter: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    code, err = run_merge(
        capsys, "--base", llama, "--adapter", llama_adapter, "--output", out, "--max-shard-size", "5XB"
    )
    assert code == 2  # a usage error, refused when the arguments are parsed
    assert err == "Error: --max-shard-size '5XB' is not a size.\nFix: Use a number with a unit, e.g. 5GB or 500MB.\n"
    assert_nothing_written(out)


def test_output_inside_input_refused(llama: Path, llama_adapter: Path, capsys) -> None:
    code, err = run_merge(capsys, "--base", llama, "--adapter", llama_adapter, "--output", llama_adapter / "merged")
    assert code == 1
    assert err == (
        f"Error: The output folder `{llama_adapter / 'merged'}` overlaps the input folder `{llama_adapter}`.\n"
        "Fix: Choose an --output outside the base and adapter folders.\n"
    )


def test_interrupted_merge_leaves_no_folder(llama: Path, llama_adapter: Path, tmp_path: Path, monkeypatch) -> None:
    """A failure in the middle of writing (disk error, Ctrl-C) removes the partial output."""
    import loraship.engine.merge as merge_module
    import loraship.engine.stream as stream_module

    calls = {"n": 0}
    real = stream_module.TensorStreamer.work

    def failing(self, t):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(self, t)

    monkeypatch.setattr(stream_module.TensorStreamer, "work", failing)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        merge_module.merge(llama, llama_adapter, out, progress=False)
    assert_nothing_written(out)


def test_disk_full_while_writing(llama: Path, llama_adapter: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """An error on the writer thread (here: no space left) stops the merge with a clear message."""
    import errno

    from loraship.engine.safetensors_io import ShardWriter

    real = ShardWriter.write
    calls = {"n": 0}

    def full(self, data):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(ShardWriter, "write", full)
    out = tmp_path / "out"
    code, err = run_merge(capsys, "--base", llama, "--adapter", llama_adapter, "--output", out)
    assert code == 1
    assert err == (
        f"Error: Writing the merged model into `{out}` failed: No space left on device.\n"
        "Fix: Check the free space and permissions of the output disk, then run again.\n"
    )
    assert_nothing_written(out)


# --------------------------------------------------------------------------- hostile folders


def test_link_out_of_the_adapter_folder_is_refused(llama: Path, llama_adapter: Path, tmp_path: Path, capsys) -> None:
    """A tokenizer.json linking to /proc/self/environ would copy the environment (tokens) into the model."""
    (llama_adapter / "tokenizer.json").symlink_to("/proc/self/environ")
    out = tmp_path / "out"
    code, err = run_merge(capsys, "--base", llama, "--adapter", llama_adapter, "--output", out)
    assert code == 1
    target = Path("/proc/self/environ").resolve()
    assert err == (
        f"Error: `tokenizer.json` in the adapter folder `{llama_adapter}` is a link to `{target}`, outside that "
        "folder. loraship reads only files inside the folders it is given, so that no other file of this machine "
        "can end up in a merged model.\nFix: Replace the link with a copy of the file, or remove it from the folder.\n"
    )
    assert_nothing_written(out)


def test_links_out_of_the_base_folder_and_fifos_are_refused(llama: Path, llama_adapter: Path, tmp_path: Path,
                                                            capsys) -> None:  # fmt: skip
    import os

    base = tmp_path / "base"
    shutil.copytree(llama, base)
    secret = tmp_path / "secret.txt"
    secret.write_text("HF_TOKEN=hf_secret\n")
    (base / "docs").mkdir()
    (base / "docs" / "README.md").symlink_to(secret)
    out = tmp_path / "out"
    code, err = run_merge(capsys, "--base", base, "--adapter", llama_adapter, "--output", out)
    assert (code, err.splitlines()[0]) == (1, f"Error: `docs/README.md` in the base folder `{base}` is a link to "
                                              f"`{secret}`, outside that folder. loraship reads only files inside "
                                              "the folders it is given, so that no other file of this machine can "
                                              "end up in a merged model.")  # fmt: skip
    (base / "docs" / "README.md").unlink()
    (base / "docs" / "notes.md").symlink_to(base / "config.json")  # a link inside the folder is fine
    os.mkfifo(base / "pipe")
    code, err = run_merge(capsys, "--base", base, "--adapter", llama_adapter, "--output", out)
    assert (code, err) == (1, f"Error: `pipe` in the base folder `{base}` is not a regular file (a broken link, a "
                              "FIFO, a socket or a device); loraship reads only regular files.\nFix: Remove it from "
                              "the folder.\n")  # fmt: skip
    (base / "pipe").unlink()
    assert run_merge(capsys, "--base", base, "--adapter", llama_adapter, "--output", out)[0] == 0
    assert (out / "docs" / "notes.md").read_text() == (base / "config.json").read_text()
    assert secret.read_text() not in "".join(p.read_text(errors="replace") for p in out.rglob("*") if p.is_file())


def test_index_naming_a_file_outside_the_folder_is_refused(llama: Path, llama_adapter: Path, tmp_path: Path,
                                                           capsys) -> None:  # fmt: skip
    base = tmp_path / "base"
    shutil.copytree(llama, base)
    shutil.copy(base / "model.safetensors", tmp_path / "elsewhere.safetensors")
    header = json.loads((base / "model.safetensors").read_bytes()[8:].split(b"}}", 1)[0] + b"}}")
    names = [k for k in header if k != "__metadata__"]
    (base / "model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": {name: "../elsewhere.safetensors" for name in names}}
    (base / "model.safetensors.index.json").write_text(json.dumps(index))
    out = tmp_path / "out"
    code, err = run_merge(capsys, "--base", base, "--adapter", llama_adapter, "--output", out)
    assert (code, err) == (1, f"Error: `{base / 'model.safetensors.index.json'}` names the weight file "
                              f"`../elsewhere.safetensors`, outside `{base}`: an index may name only files in its own "
                              "folder.\nFix: Correct the index: its weight_map values are file names in the model "
                              "folder.\n")  # fmt: skip
    assert_nothing_written(out)


def test_local_merge_leaves_base_code_out_unless_trusted(llama: Path, llama_adapter: Path, tmp_path: Path,
                                                         capsys) -> None:  # fmt: skip
    base = tmp_path / "base"
    shutil.copytree(llama, base)
    (base / "modeling_custom.py").write_text("import os\n")
    assert run_merge(capsys, "--base", base, "--adapter", llama_adapter, "--output", tmp_path / "a")[0] == 0
    assert not (tmp_path / "a" / "modeling_custom.py").exists()
    code, _ = run_merge(capsys, "--base", base, "--adapter", llama_adapter, "--output", tmp_path / "b",
                        "--trust-remote-code")  # fmt: skip
    assert code == 0 and (tmp_path / "b" / "modeling_custom.py").read_text() == "import os\n"


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("lora_alpha", "x", 'sets `lora_alpha` to "x", but PEFT expects a number there.'),
        ("r", "8", 'sets `r` to "8", but PEFT expects a whole number from 1 there.'),
        ("target_modules", 5, "sets `target_modules` to 5, but PEFT expects a module name pattern or a list of names "
                              "there."),
        ("use_dora", "yes", 'sets `use_dora` to "yes", but PEFT expects true or false there.'),
    ],
)  # fmt: skip
def test_adapter_config_field_of_the_wrong_type(llama: Path, llama_adapter: Path, tmp_path: Path, capsys,
                                                field: str, value: object, expected: str) -> None:  # fmt: skip
    path = llama_adapter / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), field: value}))
    out = tmp_path / "out"
    code, err = run_merge(capsys, "--base", llama, "--adapter", llama_adapter, "--output", out)
    assert (code, err) == (1, f"Error: `{path}` {expected}\nFix: Correct the field (see PEFT's LoraConfig), or save "
                              "the adapter again with save_pretrained().\n")  # fmt: skip
    assert_nothing_written(out)


def test_deep_json_and_empty_inputs_get_clear_errors(llama: Path, llama_adapter: Path, tmp_path: Path, capsys) -> None:
    from safetensors.torch import save_file

    out = tmp_path / "out"
    config = llama_adapter / "adapter_config.json"
    original = config.read_text()
    config.write_text("[" * 100_000 + "]" * 100_000)
    code, err = run_merge(capsys, "--base", llama, "--adapter", llama_adapter, "--output", out)
    assert (code, err.splitlines()[0]) == (1, f"Error: `{config}` is not valid JSON (nested too deeply).")
    config.write_text(original)
    weights = llama_adapter / "adapter_model.safetensors"
    trained = weights.read_bytes()
    save_file({}, str(weights))
    code, err = run_merge(capsys, "--base", llama, "--adapter", llama_adapter, "--output", out)
    assert (code, err) == (
        1,
        f"Error: `{weights}` holds no tensors: merging it would change nothing.\n"
        "Fix: Point --adapter at the folder PeftModel.save_pretrained() wrote after training.\n",
    )
    weights.unlink()
    (llama_adapter / "adapter_model.bin").write_bytes(b"")
    code, err = run_merge(capsys, "--base", llama, "--adapter", llama_adapter, "--output", out, "--allow-pickle")
    assert code == 1 and err.startswith(
        f"Error: `{llama_adapter / 'adapter_model.bin'}` could not be loaded with torch.load(weights_only=True): "
    )
    (llama_adapter / "adapter_model.bin").unlink()
    weights.write_bytes(trained)
    base = tmp_path / "base"
    shutil.copytree(llama, base)
    (base / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    code, err = run_merge(capsys, "--base", base, "--adapter", llama_adapter, "--output", out)
    assert (code, err.splitlines()[0]) == (1, f"Error: `{base / 'config.json'}` is not valid JSON (nested too deeply).")
    assert_nothing_written(out)
