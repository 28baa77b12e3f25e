"""No path of this machine in anything a run publishes: local inputs are named by folder name and config hash."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from conftest import LLAMA, TOKENS
from huggingface_hub import ModelCard
from safetensors.torch import load_file, save_file

from loraship.cli import main
from loraship.engine.repo_files import is_host_path
from loraship.run.context import content_digest
from loraship.run.job import MergeJob
from loraship.run.model_card import job_yaml
from loraship.run.resolve import provenance_key
from loraship.tiny import build_adapter


def local_name(folder: Path, config: str) -> str:
    """The name the card must give a local input, computed here independently of loraship."""
    return f"{folder.name} (local, config sha256:{hashlib.sha256((folder / config).read_bytes()).hexdigest()[:12]})"


def make_inputs(model_cache, tmp_path: Path, *, r: int = 4) -> tuple[Path, Path]:  # type: ignore[no-untyped-def]
    """A local base whose config.json and tokenizer_config.json carry its absolute path (as older
    transformers wrote them), and a local adapter whose config names that path as its base (as PEFT does)."""
    base = tmp_path / "base"
    shutil.copytree(model_cache(LLAMA, tokenizer=True), base)
    for name, key in (("config.json", "_name_or_path"), ("tokenizer_config.json", "name_or_path")):
        data = json.loads((base / name).read_text())
        (base / name).write_text(json.dumps({**data, key: str(base)}, indent=2))
    adapter = build_adapter(base, tmp_path / "adapter", target_modules=["q_proj", "v_proj"], r=r)
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base)
    return base, adapter


def host_paths(tmp_path: Path, *inputs: Path) -> set[str]:
    return {str(tmp_path), str(tmp_path.resolve()), *(str(p) for p in inputs), *(str(p.resolve()) for p in inputs)}


def assert_no_host_path(folder: Path, paths: set[str]) -> None:
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"README.md", "config.json", "tokenizer_config.json", "model.safetensors"}
    for path in files:
        data = path.read_bytes()
        for host in paths:
            assert host.encode() not in data, f"{path.name} holds the host path {host}"


def run_cli(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    code = main(["run", *map(str, args), "--quiet"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_local_inputs_leave_no_host_path_in_the_output_folder(model_cache, tmp_path: Path, capsys) -> None:
    base, adapter = make_inputs(model_cache, tmp_path)
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "--adapter", adapter, "--base", base, "--output", f"dir:{out}",
                           "--result", tmp_path / "result.json")  # fmt: skip
    assert code == 0, err
    paths = host_paths(tmp_path, base, adapter, out)
    assert_no_host_path(out, paths)
    result = json.loads((tmp_path / "result.json").read_text())["results"][0]
    for published in (result["report_markdown"], json.dumps(result["report"]), result["base"], result["adapter"]):
        assert not any(host in published for host in paths)

    base_name, adapter_name = local_name(base, "config.json"), local_name(adapter, "adapter_config.json")
    assert (
        base_name.startswith("base (local, config sha256:")
        and len(base_name) == len("base (local, config sha256:)") + 12
    )
    assert (result["base"], result["adapter"]) == (base_name, adapter_name)
    text = (out / "README.md").read_text()
    data = ModelCard.load(out / "README.md").data.to_dict()
    assert "base_model" not in data and "base_model_relation" not in data  # no Hub repo named anywhere
    assert (data["loraship"]["base"], data["loraship"]["adapter"]) == (base_name, adapter_name)
    assert (data["loraship"]["base_sha"], data["loraship"]["adapter_sha"]) == (None, None)
    assert f"out is `{base_name}` with the LoRA adapter `{adapter_name}` merged into its weights" in text
    assert f"| Base model | `{base_name}` |\n| Adapter | `{adapter_name}` |\n" in text
    assert f"Base: `{base_name}`; adapter: `{adapter_name}`; merged: `out`." in text
    assert "    adapter: ./adapter\n    base: ./base\n    output: dir:./out\n" in text
    assert "_name_or_path" not in json.loads((out / "config.json").read_text())
    assert "name_or_path" not in json.loads((out / "tokenizer_config.json").read_text())


def test_a_local_base_takes_base_model_from_the_hub_repo_its_adapter_names(model_cache, tmp_path: Path,
                                                                          capsys) -> None:  # fmt: skip
    base, adapter = make_inputs(model_cache, tmp_path)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "meta/base"}))
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "--adapter", adapter, "--base", base, "--output", f"dir:{out}", "--no-verify")
    assert code == 0, err
    assert_no_host_path(out, host_paths(tmp_path, base, adapter, out))
    data = ModelCard.load(out / "README.md").data.to_dict()
    assert (data["base_model"], data["base_model_relation"]) == ("meta/base", "finetune")
    assert data["loraship"]["base"] == local_name(base, "config.json")


def test_a_hub_output_from_local_inputs_publishes_no_host_path_and_reruns_are_no_ops(
    model_cache, hub_server, tmp_path: Path, capsys, monkeypatch
) -> None:
    monkeypatch.setenv("HF_ENDPOINT", hub_server.url)
    monkeypatch.setenv("HF_TOKEN", TOKENS["alice"])
    base, adapter = make_inputs(model_cache, tmp_path)
    args = ("--adapter", adapter, "--base", base, "--output", "alice/merged", "--no-verify")
    code, _, err = run_cli(capsys, *args)
    assert code == 0, err
    commits = hub_server.commit_list("alice/merged")
    commit = commits[0]  # the newest: the publication (after the repo's creation)
    paths = host_paths(tmp_path, base, adapter)
    base_name = local_name(base, "config.json")
    adapter_hash = local_name(adapter, "adapter_config.json").rsplit(":", 1)[1].rstrip(")")
    assert commit.title.startswith(f"Merge a local adapter into {base_name} [loraship ")
    assert adapter_hash  # the card names the adapter by its config; the key also covers its weights
    base_id, adapter_id = content_digest(base, "config.json"), content_digest(adapter, "adapter_config.json")
    key_part = f" base local:{base_id} adapter local:{adapter_id}]"
    assert key_part in commit.title
    assert f"- base: {base_name}\n" in commit.message
    for text in (commit.title, commit.message):
        assert not any(host in text for host in paths)
    for name in commit.files:
        data = hub_server.file("alice/merged", name)
        assert not any(host.encode() in data for host in paths), name

    code, out, err = run_cli(capsys, *args)  # the same inputs: recognised by the provenance key
    assert code == 0 and "already-published" in out, err
    assert len(hub_server.commit_list("alice/merged")) == len(commits)

    weights = adapter / "adapter_model.safetensors"  # retrained in place, the same config: a new publication
    tensors = load_file(weights)
    save_file({k: v + 1 for k, v in tensors.items()}, weights)
    code, out, err = run_cli(capsys, *args)
    assert code == 0 and "already-published" not in out, err
    commits = hub_server.commit_list("alice/merged")

    other = tmp_path / "other"  # another local adapter (another config): a new publication
    build_adapter(base, other / "adapter", target_modules=["q_proj"], r=2)
    code, out, err = run_cli(capsys, "--adapter", other / "adapter", "--base", base, "--output", "alice/merged",
                             "--no-verify")  # fmt: skip
    assert code == 0 and "already-published" not in out, err
    assert len(hub_server.commit_list("alice/merged")) == len(commits) + 1


def test_provenance_key_names_local_inputs_by_their_config_hash() -> None:
    job = MergeJob(adapter="./adapter", base="./base", output="org/merged")
    key = provenance_key(job, None, None, base_local="local:1a2b3c4d5e6f", adapter_local="local:0f9e8d7c6b5a")
    assert key == f"[loraship {job.job_hash()} base local:1a2b3c4d5e6f adapter local:0f9e8d7c6b5a]"
    hub = provenance_key(job, "a" * 40, "b" * 40)
    assert hub == f"[loraship {job.job_hash()} base aaaaaaaaaa adapter bbbbbbbbbb]"  # Hub inputs as before


def test_job_yaml_names_local_folders_and_files_by_their_names(tmp_path: Path) -> None:
    (tmp_path / "base").mkdir()
    job = MergeJob(adapter=str(tmp_path / "adapter"), base=str(tmp_path / "base"), output=f"dir:{tmp_path / 'out'}",
                   verify={"prompts": str(tmp_path / "prompts.jsonl")})  # fmt: skip
    text = job_yaml(job)
    assert str(tmp_path) not in text
    assert text.startswith("# local folders and files by their names: put them beside loraship.yaml\njobs:\n")
    assert "adapter: ./adapter\n" in text and "base: ./base\n" in text and "output: dir:./out\n" in text
    assert "prompts: ./prompts.jsonl\n" in text
    hub = MergeJob(adapter="org/lora@v1", output="org/merged")
    assert job_yaml(hub) == hub.to_yaml()


@pytest.mark.parametrize(
    ("value", "host"),
    [("/home/me/base", True), ("~/base", True), ("./base", True), ("../base", True), ("C:\\models\\base", True),
     ("a/b/c", True), ("meta/base", False), ("gpt2", False), ("", False)],
)  # fmt: skip
def test_is_host_path(value: str, host: bool) -> None:
    assert is_host_path(value) is host
