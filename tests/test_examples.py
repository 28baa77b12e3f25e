"""The examples in examples/ are real: they load, and they run against the local Hub."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from conftest import LLAMA, TOKENS
from huggingface_hub import ModelCard

from loraship.cli import main
from loraship.run.job import load_jobs
from loraship.tiny import build_adapter

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_example_loraship_yaml_runs(hub_server, model_cache, tmp_path: Path, monkeypatch, capsys) -> None:
    jobs = load_jobs(EXAMPLES / "loraship.yaml")
    assert list(jobs) == ["chat"]
    base = tmp_path / "base"
    shutil.copytree(model_cache(LLAMA, tokenizer=True), base)
    adapter = build_adapter(base, tmp_path / "adapter", target_modules=["q_proj", "v_proj"])
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "my-org/tiny-base"}))
    hub_server.seed("my-org/tiny-base", base)
    hub_server.seed("my-org/tiny-chat-lora", adapter, tags=("v1.0",))
    hub_server.users[TOKENS["alice"]].orgs = ("my-org",)
    monkeypatch.setenv("HF_ENDPOINT", hub_server.url)
    monkeypatch.setenv("HF_TOKEN", TOKENS["alice"])
    assert main(["run", "--config", str(EXAMPLES / "loraship.yaml"), "--quiet"]) == 0, capsys.readouterr().err
    repo = hub_server.repos["my-org/tiny-chat"]
    assert list(repo.tags) == ["v1.0"]
    card = hub_server.file("my-org/tiny-chat", "README.md").decode()
    (tmp_path / "README.md").write_text(card)
    assert ModelCard.load(tmp_path / "README.md").data.to_dict()["tags"] == ["lora", "merge", "loraship", "chat"]
    assert "Use the chat template that ships with this model." in card
    assert "2 of 2 prompts identical for 16 tokens" in card
