"""``loraship run`` streaming Hub to Hub: base shards downloaded one at a time, each merged shard
checked, uploaded as a blob and deleted, one commit at the end; against the local Hub."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import LLAMA, TOKENS, assert_same_tensors, load_tensors, peft_reference
from hub_server import Fault
from huggingface_hub import snapshot_download

from loraship.cli import main
from loraship.engine.merge import _PARTIAL_MARK
from loraship.tiny import build_adapter

WEIGHTS_ONLY = "verify:\n  outputs: false\n"
#: About 0.9 MB in float32, saved in shards of 100 KB: enough shards that a few are much less than the model.
DEEP = {**LLAMA, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 6, "num_attention_heads": 4,
        "num_key_value_heads": 2}  # fmt: skip


@pytest.fixture
def sharded(hub_server, model_cache, tmp_path: Path, monkeypatch) -> tuple[Path, Path]:
    """meta/sharded (a base in several safetensors shards) and alice/lora on the local Hub."""
    base = model_cache(DEEP, max_shard_size="100KB", tokenizer=True)
    assert len(list(base.glob("model-*.safetensors"))) >= 3
    adapter = build_adapter(base, tmp_path / "adapter", target_modules=["q_proj", "v_proj", "down_proj"])
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "meta/sharded"}))
    hub_server.seed("meta/sharded", base)
    hub_server.seed("alice/lora", adapter)
    monkeypatch.setenv("HF_ENDPOINT", hub_server.url)
    monkeypatch.setenv("HF_TOKEN", TOKENS["alice"])
    return base, adapter


def run_cli(capsys: pytest.CaptureFixture[str], tmp_path: Path, *args: str | Path) -> tuple[int, str]:
    job = tmp_path / "job.yaml"
    if not job.exists():
        job.write_text(WEIGHTS_ONLY)
    code = main(["run", "--config", str(job), *map(str, args), "--quiet", "--max-shard-size", "120KB"])
    captured = capsys.readouterr()
    for token in TOKENS.values():
        assert token not in captured.out and token not in captured.err
    return code, captured.err


def published(hub_server, repo_id: str) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """Each file of the repo's head and its content's hash."""
    head = hub_server.commit_list(repo_id)[0]
    return {name: f.lfs_oid or f.blob_oid for name, f in head.files.items()}


def disk_used(folder: Path) -> int:
    """Bytes the weight files under ``folder`` take on disk (a placeholder's hole takes none)."""
    return sum(p.stat().st_blocks * 512 for p in folder.rglob("*.safetensors") if p.is_file())


def test_streamed_run_publishes_what_the_sequential_path_does_with_a_few_shards_on_disk(
    sharded, hub_server, tmp_path: Path, capsys
) -> None:
    base, adapter = sharded
    work = tmp_path / "work"
    biggest_base = max(p.stat().st_size for p in base.glob("model-*.safetensors"))
    seen: list[int] = []
    overlapped: list[bool] = []

    def merged_shards() -> list[tuple[int, int]]:  # (k, n) of the merged model-0000k-of-0000n files on disk
        names = (p.name for p in work.rglob("model-*-of-*.safetensors") if _PARTIAL_MARK in p.parent.name)
        return sorted((int(m[1]), int(m[2])) for m in (re.match(r"model-(\d+)-of-(\d+)", n) for n in names) if m)

    def sample() -> None:  # at each shard's upload: the lowest-numbered merged shard on disk is the one uploading
        seen.append(disk_used(work))
        (k, n), *_ = merged_shards()
        deadline = time.monotonic() + 10
        while k < n and merged_shards()[-1][0] == k and time.monotonic() < deadline:
            time.sleep(0.01)  # the merge writes the next shard while this one uploads
        overlapped.append(merged_shards()[-1][0] > k)

    hub_server.faults.extend(Fault("PUT", "/lfs-upload/", "pass", hook=sample) for _ in range(50))
    code, err = run_cli(capsys, tmp_path, "--adapter", "alice/lora", "--output", "alice/streamed", "--workdir", work)
    assert code == 0, err
    hub_server.faults.clear()
    code, err = run_cli(capsys, tmp_path, "--adapter", "alice/lora", "--output", "alice/sequential", "--no-stream")
    assert code == 0, err

    streamed, sequential = published(hub_server, "alice/streamed"), published(hub_server, "alice/sequential")
    shards = [f for f in streamed if f.endswith(".safetensors")]
    assert len(shards) >= 3 and "model.safetensors.index.json" in streamed
    # Bit-identical: every file but the card (which names its own repo) is the same blob in both repos.
    assert {f: h for f, h in streamed.items() if f != "README.md"} == {
        f: h for f, h in sequential.items() if f != "README.md"
    }
    assert [c.title for c in hub_server.commit_list("alice/streamed")][1:] == ["initial commit"]  # one commit
    folder = Path(snapshot_download("alice/streamed", endpoint=hub_server.url, token=TOKENS["alice"],
                                    cache_dir=tmp_path / "readback"))  # fmt: skip
    assert_same_tensors(load_tensors(folder), peft_reference(base, adapter, tmp_path / "peft"))
    assert "### loraship verification: passed" in (folder / "README.md").read_text()

    # While shards were uploading, the run's folder held a few base and merged shards, never the models.
    assert len(seen) == len(shards)
    assert overlapped[:-1] == [True] * (len(shards) - 1)  # every upload but the last overlapped the merge
    biggest_out = max(hub_server.repos["alice/streamed"].commits[hub_server.commit_list("alice/streamed")[0].oid]
                      .files[f].size for f in shards)  # fmt: skip
    placeholders = 4096 * len(list(base.glob("model-*.safetensors")))  # the headers' disk blocks
    assert max(seen) <= 3 * biggest_base + 2 * biggest_out + placeholders
    assert max(seen) < sum(p.stat().st_size for p in base.glob("model-*.safetensors"))


def test_a_shard_failing_its_check_publishes_nothing_and_removes_the_new_repo(
    sharded, hub_server, tmp_path: Path, capsys, monkeypatch
) -> None:
    from loraship.run.streaming import ShardStream

    real_after = ShardStream.after

    def corrupting_after(self, shard, path, tensors):  # type: ignore[no-untyped-def]
        if shard.startswith("model-00002"):  # a bit flips in the second shard after it was written
            data = bytearray(path.read_bytes())
            data[-3] ^= 0x40
            path.write_bytes(bytes(data))
        return real_after(self, shard, path, tensors)

    monkeypatch.setattr(ShardStream, "after", corrupting_after)
    code, err = run_cli(capsys, tmp_path, "--adapter", "alice/lora", "--output", "alice/merged")
    assert code == 1
    assert err.endswith(
        "Error: The merged model does not match base + adapter: weights: changed tensors recomputed.\n"
        "Fix: Do not publish it. Merge again with `loraship merge` (and check that the adapter and base are the ones "
        "it was trained with); the report says which tensors or outputs differ.\n"
    ) or err.endswith(
        "Error: The merged model does not match base + adapter: weights: untouched tensors.\n"
        "Fix: Do not publish it. Merge again with `loraship merge` (and check that the adapter and base are the ones "
        "it was trained with); the report says which tensors or outputs differ.\n"
    ), err
    assert "alice/merged" not in hub_server.repos  # created for the upload, deleted with nothing committed


@pytest.mark.slow
def test_a_failed_shard_upload_publishes_nothing(sharded, hub_server, tmp_path: Path, capsys) -> None:
    hub_server.seed("alice/merged", tmp_path / "adapter")  # an existing repo: it must stay as it was
    commits = hub_server.commit_list("alice/merged")
    hub_server.faults.append(Fault("PUT", "/lfs-upload/", "pass"))  # the first shard goes through,
    hub_server.faults.extend(Fault("PUT", "/lfs-upload/", "drop") for _ in range(20))  # then the network breaks
    code, err = run_cli(capsys, tmp_path, "--adapter", "alice/lora", "--output", "alice/merged")
    assert code == 1, err
    assert re.search(r"Error: Cannot reach `127\.0\.0\.1:\d+`: \w+ \(.*\)\.\nFix: Check the network connection", err), (
        err
    )
    assert hub_server.commit_list("alice/merged") == commits


@pytest.mark.slow
def test_killed_while_streaming_leaves_an_empty_repo_and_the_rerun_publishes_once(
    sharded, hub_server, tmp_path: Path, capsys
) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(WEIGHTS_ONLY)
    cmd = [sys.executable, "-m", "loraship", "run", "--config", str(job), "--adapter", "alice/lora", "--output",
           "alice/merged", "--max-shard-size", "120KB", "--quiet"]  # fmt: skip
    env = {**os.environ, "HF_ENDPOINT": hub_server.url, "HF_TOKEN": TOKENS["alice"]}
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    hub_server.faults.append(Fault("PUT", "/lfs-upload/", "pass"))
    hub_server.faults.append(Fault("PUT", "/lfs-upload/", "drop", hook=lambda: os.killpg(proc.pid, signal.SIGKILL)))
    proc.wait(timeout=120)
    assert proc.returncode == -signal.SIGKILL  # killed after one shard's blob arrived, with the next on its way
    assert [c.title for c in hub_server.commit_list("alice/merged")] == ["initial commit"]  # nothing published
    assert set(hub_server.commit_list("alice/merged")[0].files) <= {".gitattributes"}
    code, err = run_cli(capsys, tmp_path, "--adapter", "alice/lora", "--output", "alice/merged")
    assert code == 0, err
    assert [c.title for c in hub_server.commit_list("alice/merged")][1:] == ["initial commit"]


@pytest.mark.slow
def test_output_check_in_bounded_memory_on_both_models_kept_on_disk(
    sharded, hub_server, tmp_path: Path, capsys
) -> None:
    base, adapter = sharded
    (tmp_path / "job.yaml").write_text("verify:\n  generation_tokens: 4\n")
    result = tmp_path / "result.json"
    code, err = run_cli(capsys, tmp_path, "--adapter", "alice/lora", "--output", "alice/merged",
                        "--max-memory", "200KB", "--result", result)  # fmt: skip
    assert code == 0, err
    folder = Path(snapshot_download("alice/merged", endpoint=hub_server.url, token=TOKENS["alice"],
                                    cache_dir=tmp_path / "readback"))  # fmt: skip
    assert_same_tensors(load_tensors(folder), peft_reference(base, adapter, tmp_path / "peft"))
    card = (folder / "README.md").read_text()
    assert "merge error / adapter effect" in card and "### loraship verification: passed" in card
    report = json.loads(result.read_text())["results"][0]["report"]
    assert report["passed"] and report["outputs"]["prompts"] == 5
    assert any(n.startswith("Both models ran with at most 200.0 KB of weights in memory") for n in report["notes"])


@pytest.mark.parametrize("family", ["qwen3-moe-experts", "fp8", "fp8-requantize"])
def test_streamed_and_sequential_runs_publish_the_same_bytes(family: str, hub_server, tmp_path: Path, capsys,
                                                            monkeypatch) -> None:  # fmt: skip
    """MoE experts (one LoRA on a fused parameter, merged into per-expert tensors that may lie in other
    shards) and FP8 bases (scales beside their weights; requantized ones checked with their weight)."""
    from test_families import QWEN3_MOE
    from test_quantized import DENSE

    from loraship.tiny import build_model, quantize_fp8

    flags: list[str] = []
    if family == "qwen3-moe-experts":
        config = {**QWEN3_MOE, "num_hidden_layers": 3}
        base = build_model(tmp_path / "base", config, max_shard_size="8KB", tokenizer=True)
        lora = {"target_modules": ["q_proj"], "target_parameters": ["mlp.experts.gate_up_proj"]}
    else:
        base = build_model(tmp_path / "base", {**DENSE, "num_hidden_layers": 3}, dtype="bfloat16",
                           max_shard_size="40KB", tokenizer=True)  # fmt: skip
        quantize_fp8(base, block=(32, 32))
        lora = {"target_modules": ["q_proj", "v_proj", "down_proj"]}
        flags = ["--requantize"] if family == "fp8-requantize" else []
    assert len(list(base.glob("model-*.safetensors"))) >= 3
    adapter = build_adapter(base, tmp_path / "adapter", **lora)
    hub_server.seed("meta/base", base)
    hub_server.seed("alice/lora", adapter)
    monkeypatch.setenv("HF_ENDPOINT", hub_server.url)
    monkeypatch.setenv("HF_TOKEN", TOKENS["alice"])
    (tmp_path / "job.yaml").write_text(WEIGHTS_ONLY + "base: meta/base\n")
    for output, stream in (("alice/streamed", []), ("alice/sequential", ["--no-stream"])):
        code = main(["run", "--config", str(tmp_path / "job.yaml"), "--adapter", "alice/lora", "--output", output,
                     "--max-shard-size", "30KB", "--quiet", *flags, *stream])  # fmt: skip
        assert code == 0, capsys.readouterr().err
    streamed, sequential = published(hub_server, "alice/streamed"), published(hub_server, "alice/sequential")
    assert len([f for f in streamed if f.endswith(".safetensors")]) >= 2
    assert {f: h for f, h in streamed.items() if f != "README.md"} == {
        f: h for f, h in sequential.items() if f != "README.md"
    }
