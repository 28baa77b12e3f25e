"""The examples in examples/ are real: they load, and they run against the local Hub."""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import shutil
import typing
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from conftest import LLAMA, TOKENS
from huggingface_hub import ModelCard

from loraship.cli import build_parser, main
from loraship.run.job import MergeJob, load_jobs
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


def example_job_keys(data: dict, prefix: str = "") -> set[str]:
    keys = set()
    for key, value in data.items():
        keys.add(f"{prefix}{key}")
        if isinstance(value, dict):
            keys |= example_job_keys(value, f"{prefix}{key}.")
    return keys


def schema_keys(model: type, prefix: str = "") -> set[str]:
    from pydantic import BaseModel

    keys = set()
    for name, field in model.model_fields.items():
        if prefix == "" and name == "name":  # a job's name is its key under `jobs:`
            continue
        keys.add(f"{prefix}{name}")
        nested = [t for t in (field.annotation, *typing.get_args(field.annotation)) if isinstance(t, type)]
        for t in nested:
            if issubclass(t, BaseModel):
                keys |= schema_keys(t, f"{prefix}{name}.")
    return keys


def test_example_loraship_yaml_shows_every_key_with_valid_values(tmp_path: Path) -> None:
    """The file says it shows every key: the keys it sets, and those it shows commented out, are exactly the
    schema's (a key added to MergeJob must be added here); uncommented, the file is still a valid job."""
    text = (EXAMPLES / "loraship.yaml").read_text()
    uncommented = re.sub(r"^(\s*)# (\w+):", r"\1\2:", text, flags=re.M)
    (tmp_path / "loraship.yaml").write_text(uncommented)
    jobs = load_jobs(tmp_path / "loraship.yaml")  # every shown value, commented or not, is valid
    data = yaml.safe_load(uncommented)["jobs"]["chat"]
    assert example_job_keys(data) == schema_keys(MergeJob)
    assert jobs["chat"].verify.max_memory is not None and jobs["chat"].requantize is False


def workflows() -> list[Path]:
    files = sorted((EXAMPLES / "workflows").glob("*.yml"))
    assert len(files) >= 4
    return files


def test_example_workflows_use_the_action_and_the_cli_as_declared() -> None:
    """Each workflow passes the action only inputs action.yml declares, reads only its outputs, and calls
    `loraship run` with flags the CLI has (actionlint, in test_action.py, checks the rest of the YAML)."""
    action = yaml.safe_load((EXAMPLES.parent / "action.yml").read_text())
    used = 0
    for path in workflows():
        text = path.read_text()
        workflow = yaml.safe_load(text)
        for job in workflow["jobs"].values():
            for step in job["steps"]:
                if "/loraship@" in step.get("uses", ""):
                    used += 1
                    assert set(step.get("with", {})) <= set(action["inputs"]), path.name
                if "loraship run" in step.get("run", ""):
                    used += 1
                    flags = set(re.findall(r"(?<![\w-])--[a-z][\w-]*", step["run"]))  # the command's, and its array's
                    parser_flags = {s for a in run_parser()._actions for s in a.option_strings}
                    assert flags and flags <= parser_flags, (path.name, flags - parser_flags)
        assert set(re.findall(r"steps\.loraship\.outputs\.([\w-]+)", text)) <= set(action["outputs"]), path.name
    assert used >= 4


def run_parser() -> argparse.ArgumentParser:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["run"]


@pytest.mark.parametrize("name", ["loraship-dispatch.yml", "loraship-dispatch-cpu.yml"])
def test_example_dispatch_workflow_takes_the_inputs_the_bot_sends(name: str) -> None:
    """The dispatch examples take exactly the inputs the bot's github executor dispatches (the CPU one is also
    run through act on both dispatch events, tests/container/test_workflows.py)."""
    from loraship.bot.executors import GitHubActionsExecutor

    sent: list[dict[str, str]] = []

    class FakeGitHub:
        def dispatch_workflow(self, workflow: str, ref: str, inputs: dict[str, str]) -> None:
            sent.append(inputs)

    executor = GitHubActionsExecutor.__new__(GitHubActionsExecutor)
    executor.spec = SimpleNamespace(workflow="loraship-dispatch.yml", ref="main", repository="your-org/merges")
    executor.github = FakeGitHub()
    job = SimpleNamespace(repo="your-org/your-lora", sha="0" * 40, ref="refs/tags/v1", rule="v*", kind="tag")
    merge_job = MergeJob(adapter="your-org/your-lora@" + "0" * 40, output="your-org/your-model")
    with contextlib.suppress(AttributeError, TypeError):  # the report after the dispatch may want more of a job
        executor.run(job, merge_job)
    assert sent, "the executor dispatched nothing"
    workflow = yaml.safe_load((EXAMPLES / "workflows" / name).read_text())
    inputs = workflow[True]["workflow_dispatch"]["inputs"]  # PyYAML reads the key `on` as True
    assert set(inputs) == set(sent[0])
    assert {k for k, v in inputs.items() if v.get("required")} <= {k for k, v in sent[0].items() if v}
