"""The merged folder as users receive it: files, config, shards, dtype, overwrite, progress, plan."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import LLAMA, assert_same_tensors, load_tensors, peft_reference

from loraship.cli import main
from loraship.engine.merge import merge
from loraship.engine.safetensors_io import TensorReader, read_header
from loraship.tiny import build_adapter, save_tokenizer


@pytest.fixture
def base_repo(model_cache, tmp_path: Path) -> Path:
    """A base folder shaped like a Hub repo: tokenizer, chat template, card, extra files and formats."""
    base = tmp_path / "base"
    shutil.copytree(model_cache(LLAMA, tokenizer=True), base)
    (base / "README.md").write_text("---\nlicense: apache-2.0\n---\n# Base model card\n")
    (base / "pytorch_model.bin").write_bytes(b"stale pickled copy of the base weights")
    (base / "original").mkdir()
    (base / "original" / "consolidated.00.pth").write_bytes(b"stale weights in the original format")
    (base / "1_Pooling").mkdir()
    (base / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}\n')
    (base / "modules.json").write_text("[]\n")
    (base / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    return base


def test_non_weight_files_are_carried_over(base_repo: Path, tmp_path: Path) -> None:
    adapter = build_adapter(base_repo, tmp_path / "adapter", target_modules=["q_proj"])
    result = merge(base_repo, adapter, tmp_path / "out", progress=False)
    out = tmp_path / "out"
    names = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert names == [
        "1_Pooling/config.json", "chat_template.jinja", "config.json", "generation_config.json", "model.safetensors",
        "modules.json", "tokenizer.json", "tokenizer_config.json",
    ]  # fmt: skip
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (out / name).read_bytes() == (base_repo / name).read_bytes()
    assert dict(result.left_out) == {
        "README.md": "the base's model card: a new card describes the merged model",
        "original/consolidated.00.pth": "weights of the unmerged base in another format",
        "pytorch_model.bin": "weights of the unmerged base in another format",
    }
    assert json.loads((out / "config.json").read_text()) == json.loads((base_repo / "config.json").read_text())


def test_adapter_tokenizer_and_chat_template_win(base_repo: Path, tmp_path: Path) -> None:
    adapter = build_adapter(base_repo, tmp_path / "adapter", target_modules=["q_proj"])
    save_tokenizer(adapter, 64, extra_tokens=("<tool>",))
    (adapter / "chat_template.jinja").write_text("{{ messages[0]['content'] }} <tool>")
    merge(base_repo, adapter, tmp_path / "out", progress=False)
    out = tmp_path / "out"
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (out / name).read_bytes() == (adapter / name).read_bytes()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    assert "<tool>" in tok.get_vocab()
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "hi <tool>"


def test_adapter_chat_template_alone_wins(base_repo: Path, tmp_path: Path) -> None:
    adapter = build_adapter(base_repo, tmp_path / "adapter", target_modules=["q_proj"])
    (adapter / "chat_template.jinja").write_text("new template")
    merge(base_repo, adapter, tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "chat_template.jinja").read_text() == "new template"
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (base_repo / "tokenizer.json").read_bytes()


def test_sharded_output_and_index(model_cache, tmp_path: Path) -> None:
    base = model_cache(LLAMA)
    adapter = build_adapter(base, tmp_path / "adapter", target_modules=["q_proj", "down_proj"])
    merge(base, adapter, tmp_path / "sharded", max_shard_size="4KB", progress=False)
    merge(base, adapter, tmp_path / "single", progress=False)
    out = tmp_path / "sharded"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert sorted(set(index["weight_map"].values())) == shards
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in load_tensors(out).values())
    for shard in shards:
        metadata, tensors = read_header(out / shard)
        assert metadata == {"format": "pt"}
        assert all(index["weight_map"][name] == shard for name in tensors)
    assert_same_tensors(load_tensors(out), load_tensors(tmp_path / "single"))
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(out))  # loads with plain transformers


def test_sharded_base_input(model_cache, tmp_path: Path) -> None:
    sharded = model_cache(LLAMA, max_shard_size="5KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    adapter = build_adapter(sharded, tmp_path / "adapter", target_modules=["q_proj", "gate_proj"])
    merge(sharded, adapter, tmp_path / "out", progress=False)
    assert_same_tensors(load_tensors(tmp_path / "out"), peft_reference(sharded, adapter, tmp_path / "peft"))


@pytest.mark.parametrize(("base_dtype", "out_dtype"), [("float32", "bfloat16"), ("bfloat16", "float32"),
                                                        ("float32", "float16")])  # fmt: skip
def test_dtype_conversion_matches_loading_base_in_that_dtype(
    model_cache, tmp_path: Path, base_dtype, out_dtype
) -> None:
    base = model_cache(LLAMA, dtype=base_dtype)
    adapter = build_adapter(
        base, tmp_path / "adapter", target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]
    )
    main(["merge", "--base", str(base), "--adapter", str(adapter), "--output", str(tmp_path / "out"),
          "--dtype", out_dtype, "--quiet"])  # fmt: skip
    reference = peft_reference(base, adapter, tmp_path / "peft", dtype=getattr(torch, out_dtype))
    assert_same_tensors(load_tensors(tmp_path / "out"), reference)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == out_dtype


def test_overwrite_replaces_output(model_cache, tmp_path: Path) -> None:
    base = model_cache(LLAMA)
    adapter = build_adapter(base, tmp_path / "adapter", target_modules=["q_proj"])
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    assert main(["merge", "--base", str(base), "--adapter", str(adapter), "--output", str(out), "--overwrite",
                 "--quiet"]) == 0  # fmt: skip
    assert not (out / "stale.txt").exists()
    assert (out / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_merge_prints_summary_and_progress(model_cache, tmp_path: Path, capsys) -> None:
    base = model_cache(LLAMA)
    adapter = build_adapter(base, tmp_path / "adapter", target_modules=["q_proj"])
    assert main(["merge", "--base", str(base), "--adapter", str(adapter), "--output", str(tmp_path / "a"),
                 "--progress"]) == 0  # fmt: skip  # stderr is not a terminal here: bars only when asked
    captured = capsys.readouterr()
    assert "Merging" in captured.err  # the progress bar, on stderr
    assert f"Wrote {tmp_path / 'a'}: 1 weight file(s)" in captured.out
    assert "2 of 21 tensors changed" in captured.out
    assert main(["merge", "--base", str(base), "--adapter", str(adapter), "--output", str(tmp_path / "b"),
                 "--quiet"]) == 0  # fmt: skip
    assert capsys.readouterr().err == ""


def test_plan_lists_changes_without_reading_tensor_data(model_cache, tmp_path: Path, capsys, monkeypatch) -> None:
    base = model_cache(LLAMA)
    adapter = build_adapter(base, tmp_path / "adapter", target_modules=["q_proj"], use_rslora=True, r=4,
                            lora_alpha=8, modules_to_save=["lm_head"])  # fmt: skip

    def no_reads(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("plan read tensor data")

    monkeypatch.setattr(TensorReader, "read_bytes", no_reads)
    assert main(["plan", "--base", str(base), "--adapter", str(adapter)]) == 0
    out = capsys.readouterr().out
    assert "model.layers.0.self_attn.q_proj.weight  16x16  F32    LoRA r=4 scale=4" in out
    assert "lm_head.weight                          64x16  F32    replace (modules to save)" in out
    assert "3 of 21 output tensors change; 18 are copied unchanged." in out
    assert "Every adapter tensor is accounted for: 5 applied." in out
    settings = "r = 4, alpha = 8, scale = 4 (rsLoRA); plus 1 trained full tensors (modules_to_save / saved layers)"
    assert "Adapter: " in out and f"(LoRA: {settings}; 5 tensors)" in out

    assert main(["plan", "--base", str(base), "--adapter", str(adapter), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)  # stdout holds the JSON and nothing else
    assert data["adapter"] | {"path": None} == {
        "path": None, "method": "LoRA", "peft_type": "LORA",
        "settings": settings,
        "r": 4, "lora_alpha": 8, "use_rslora": True, "use_dora": False, "tensors": 5,
    }  # fmt: skip
    assert data["output"] | {"bytes": None, "largest_tensor_bytes": None} == {
        "tensors": 21, "changed": 3, "bytes": None, "largest_tensor_bytes": None
    }  # fmt: skip
    assert len(data["tensors"]) == 21 and data["accounting"] == {"applied": 5, "ignored": []}
    q = next(t for t in data["tensors"] if t["name"] == "model.layers.0.self_attn.q_proj.weight")
    assert q == {
        "name": "model.layers.0.self_attn.q_proj.weight", "shape": [16, 16], "dtype": "F32",
        "source": "model.layers.0.self_attn.q_proj.weight", "source_dtype": "F32", "changed": True,
        "change": "LoRA r=4 scale=4", "requantize": None,
        "steps": [{"kind": "lora", "module": "model.layers.0.self_attn.q_proj", "param": "weight", "rank": 4,
                   "alpha": 8, "scale": 4, "layout": "linear"}],
    }  # fmt: skip
    head = next(t for t in data["tensors"] if t["name"] == "lm_head.weight")
    assert head["steps"] == [{"kind": "replace", "tensor": "base_model.model.lm_head.weight",
                              "origin": "modules_to_save"}]  # fmt: skip


def test_vocabulary_resize_updates_config(model_cache, tmp_path: Path) -> None:
    base = model_cache(LLAMA)
    lora = {"target_modules": ["q_proj"], "modules_to_save": ["embed_tokens", "lm_head"]}
    adapter = build_adapter(base, tmp_path / "adapter", resize_vocab=70, **lora)
    result = merge(base, adapter, tmp_path / "out", progress=False)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["vocab_size"] == 70
    assert "The adapter resizes the vocabulary from 64 to 70 tokens: config.json follows." in result.prepared.notes


def test_classification_head_added_to_a_causal_lm_base(model_cache, tmp_path: Path) -> None:
    """An adapter trained on LlamaForSequenceClassification from a causal-LM checkpoint brings its head."""
    import transformers
    from peft import LoraConfig, PeftModel, get_peft_model

    base = model_cache(LLAMA)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(str(base), num_labels=3)
    peft_model = get_peft_model(
        model, LoraConfig(task_type="SEQ_CLS", target_modules=["q_proj"], init_lora_weights=False)
    )
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    result = merge(base, tmp_path / "adapter", tmp_path / "out", progress=False)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"]
    assert config["id2label"] == {"0": "LABEL_0", "1": "LABEL_1", "2": "LABEL_2"}
    assert [t.name for t in result.prepared.plan.tensors if t.source is None] == ["score.weight"]
    inputs = {"input_ids": torch.tensor([[1, 5, 9, 2]])}
    reference_model = transformers.AutoModelForSequenceClassification.from_pretrained(str(base), num_labels=3)
    with torch.no_grad():
        expected = PeftModel.from_pretrained(reference_model, str(tmp_path / "adapter")).eval()(**inputs).logits
        merged = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "out")).eval()
        torch.testing.assert_close(merged(**inputs).logits, expected, rtol=1e-5, atol=1e-5)


def test_output_folder_gets_the_normal_umask_not_mkdtemps_0700(model_cache, tmp_path: Path) -> None:
    import os
    import stat

    base = model_cache(LLAMA)
    adapter = build_adapter(base, tmp_path / "adapter", target_modules=["q_proj"])
    old = os.umask(0o022)
    try:
        merge(base, adapter, tmp_path / "merged", progress=False)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "merged").stat().st_mode) == 0o755  # a server running as another user reads it
    for f in (tmp_path / "merged").iterdir():
        assert stat.S_IMODE(f.stat().st_mode) & 0o044 == 0o044, f.name
