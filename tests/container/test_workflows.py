"""The example workflows that need no GPU, run by nektos/act on the events they declare, with the action's
image built from this checkout, against the local Hub and GitHub on 127.0.0.1.

The workflow files are the ones users copy, byte for byte; only the endpoints differ (HF_ENDPOINT and
GITHUB_API_URL in the job's environment, as a GitHub Enterprise Server or a Hub mirror would set them).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import GH_TOKEN, LLAMA, TOKENS
from github_server import FakeGitHub
from harness import ROOT, ActRun, act, git_repo

from loraship.tiny import build_adapter

WORKFLOWS = ROOT / "examples" / "workflows"
HF_TOKEN = TOKENS["alice"]
#: What the workflows name: the adapter, its base, the output.
ADAPTER, BASE, OUTPUT = "your-org/your-lora", "your-org/your-base", "your-org/your-merged-model"


def gpu_free(path: Path) -> bool:
    """A workflow that runs on a GitHub-hosted runner with no GPU option anywhere."""
    workflow = yaml.safe_load(path.read_text())
    return all(job["runs-on"] == "ubuntu-latest" and "--gpus" not in json.dumps(job) and
               "cuda" not in json.dumps(job) for job in workflow["jobs"].values())  # fmt: skip


def test_the_gpu_free_examples_are_the_ones_run_here() -> None:
    """A new GPU-free example must get a run below (this list is what the tests cover)."""
    assert sorted(p.name for p in WORKFLOWS.glob("*.yml") if gpu_free(p)) == [
        "loraship-dispatch-cpu.yml", "merge-on-tag-cpu.yml"]  # fmt: skip


@pytest.fixture
def hub(hub_server, model_cache, tmp_path: Path):  # type: ignore[no-untyped-def]
    """The local Hub with the base and the adapter (tag v1.2) the examples name, writable by alice."""
    hub_server.add_user(TOKENS["alice"], "alice", orgs=("your-org",))
    base = tmp_path / "base"
    shutil.copytree(model_cache(LLAMA, tokenizer=True), base)
    hub_server.seed(BASE, base)
    adapter = build_adapter(base, tmp_path / "adapter", target_modules=["q_proj", "v_proj"])
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": BASE}))
    hub_server.seed(ADAPTER, adapter, tags=("v1.2",))
    return hub_server


def endpoints(hub_server: Any, github: FakeGitHub) -> dict[str, str]:
    # HF_HUB_DISABLE_XET: the local Hub speaks plain LFS only.
    return {"HF_ENDPOINT": hub_server.url, "GITHUB_API_URL": github.url, "HF_HUB_DISABLE_XET": "1"}


def user_repo(tmp_path: Path, workflow: str, *, repository: str = "octo/trainer",
              tag: str | None = None) -> tuple[Path, str]:  # fmt: skip
    """The user's repository: the example workflow unchanged, and files named like the image's own modules
    (a workspace must not shadow the action's entry point or its packages)."""
    files = {
        f".github/workflows/{workflow}": (WORKFLOWS / workflow).read_text(),
        "entrypoint/__init__.py": "",
        "entrypoint/__main__.py": "raise SystemExit('the workspace shadowed the action')\n",
        "loraship/__init__.py": "raise ImportError('the workspace shadowed loraship')\n",
        "torch.py": "raise ImportError('the workspace shadowed torch')\n",
    }
    repo = tmp_path / "user-repo"
    return repo, git_repo(repo, files, repository=repository, tag=tag)


def push_event(sha: str, tag: str) -> dict[str, Any]:
    return {"ref": f"refs/tags/{tag}", "before": "0" * 40, "after": sha, "created": True, "deleted": False,
            "repository": {"full_name": "octo/trainer", "name": "trainer", "owner": {"login": "octo"},
                           "default_branch": "main"},
            "pusher": {"name": "octo"}, "sender": {"login": "octo"}}  # fmt: skip


def assert_no_secret(run: ActRun) -> None:
    """No token in anything act logged, but the ``::add-mask::`` commands that hide it (the runner shows ***)."""
    everything = run.stderr + json.dumps([line for line in run.log if line.get("command") != "add-mask"])
    assert HF_TOKEN not in everything and GH_TOKEN not in everything, "a token reached the log"


def test_tag_push_publishes_tags_reports_and_a_rerun_is_a_no_op(images, hub, github, tmp_path: Path) -> None:
    repo, sha = user_repo(tmp_path, "merge-on-tag-cpu.yml", tag="v1.2")
    secrets = {"HF_TOKEN": HF_TOKEN, "GITHUB_TOKEN": GH_TOKEN}
    run = act(repo, "push", push_event(sha, "v1.2"), workflow="merge-on-tag-cpu.yml", secrets=secrets,
              env=endpoints(hub, github))  # fmt: skip
    assert run.job_result == "success", run.text + run.stderr
    assert_no_secret(run)
    # The Hub: one merge commit on the output repo, tagged with the pushed tag, from the adapter's tag.
    (commit, _) = hub.commit_list(OUTPUT)
    adapter_sha = hub.repos[ADAPTER].tags["v1.2"]
    assert commit.title.endswith(f"adapter {adapter_sha[:10]}]")
    assert hub.repos[OUTPUT].tags == {"v1.2": commit.oid}
    assert "model.safetensors" in {f for f in hub.repos[OUTPUT].commits[commit.oid].files}
    # The step's outputs and summary, as later steps and the run page see them.
    outputs = run.outputs()
    assert outputs["status"] == "published"
    assert (outputs["commit-sha"], outputs["tag"], outputs["verified"]) == (commit.oid, "v1.2", "true")
    assert outputs["repo-url"] == f"{hub.url}/{OUTPUT}"
    assert outputs["report-path"] == "loraship-report.json"
    summary = run.summary()
    assert summary.startswith(f"## loraship: published [{OUTPUT}]({hub.url}/{OUTPUT})")
    assert "### loraship verification: passed" in summary
    # GitHub: a success status on the pushed commit, and the tag's release with the report attached.
    (status,) = github.statuses
    assert (status["sha"], status["state"], status["context"]) == (sha, "success", "loraship")
    assert status["description"] == f"published: {OUTPUT} (verified)"
    (release,) = github.releases.values()
    assert release["tag_name"] == "v1.2" and "### loraship verification: passed" in release["body"]
    (asset,) = github.assets.values()
    assert asset["name"] == "loraship-report.json" and json.loads(asset["data"])["passed"] is True

    # The same tag again (a re-run of the job): nothing new on the Hub or the release.
    again = act(repo, "push", push_event(sha, "v1.2"), workflow="merge-on-tag-cpu.yml", secrets=secrets,
                env=endpoints(hub, github))  # fmt: skip
    assert again.job_result == "success", again.text + again.stderr
    assert again.outputs()["status"] == "already-published"
    assert again.outputs()["commit-sha"] == commit.oid
    assert len(hub.commit_list(OUTPUT)) == 2 and hub.repos[OUTPUT].tags == {"v1.2": commit.oid}
    assert len(github.releases) == 1 and len(github.assets) == 1
    assert again.summary().startswith(f"## loraship: already published [{OUTPUT}]")


def test_a_missing_adapter_fails_the_step_with_an_error_and_publishes_nothing(images, hub_server, github,
                                                                               tmp_path: Path) -> None:  # fmt: skip
    hub_server.add_user(TOKENS["alice"], "alice", orgs=("your-org",))  # no your-org/your-lora on this Hub
    repo, sha = user_repo(tmp_path, "merge-on-tag-cpu.yml", tag="v1.2")
    run = act(repo, "push", push_event(sha, "v1.2"), workflow="merge-on-tag-cpu.yml",
              secrets={"HF_TOKEN": HF_TOKEN, "GITHUB_TOKEN": GH_TOKEN}, env=endpoints(hub_server, github))  # fmt: skip
    assert run.code != 0 and run.job_result == "failure"
    assert run.step_result("loraship") == "failure"
    errors = [line for line in run.lines("loraship") if "::error" in line]
    assert len(errors) == 1, run.text
    assert f"{ADAPTER}" in errors[0] and "Traceback" not in run.text
    assert run.summary().startswith("## loraship failed: ")
    assert OUTPUT not in hub_server.repos
    (status,) = github.statuses
    assert (status["sha"], status["state"]) == (sha, "failure")
    assert github.releases == {}
    assert_no_secret(run)


def bot_dispatch(github: FakeGitHub, hub_url: str, adapter_sha: str, how: dict[str, str]) -> dict[str, Any]:
    """What the bot's github executor sends for a new tag v1.2 of the adapter (over HTTP, to the local GitHub)."""
    import os
    from types import SimpleNamespace

    from loraship.bot.config import BotConfig
    from loraship.bot.executors import GitHubActionsExecutor
    from loraship.run.job import MergeJob

    config = BotConfig.model_validate({
        "watch": [{"adapter": ADAPTER, "tags": ["v*"], "job": {"output": OUTPUT}}],
        "executor": {"kind": "github", "github": {"repository": "octo/merges", **how}},
    })  # fmt: skip
    os.environ["GITHUB_API_URL"] = github.url
    try:
        executor = GitHubActionsExecutor(config, GH_TOKEN)
        job = SimpleNamespace(repo=ADAPTER, sha=adapter_sha, ref="refs/tags/v1.2", rule="v*", kind="tag")
        merge_job = MergeJob(adapter=f"{ADAPTER}@{adapter_sha}", output=OUTPUT, publish={"tag": "v1.2"})
        assert executor.run(job, merge_job).state == "succeeded"  # type: ignore[arg-type]
    finally:
        os.environ.pop("GITHUB_API_URL", None)
    (dispatch,) = github.dispatches
    github.dispatches.clear()
    return dispatch


@pytest.mark.parametrize("event_name", ["workflow_dispatch", "repository_dispatch"])
def test_the_bot_dispatched_workflow_merges_the_pinned_adapter(images, hub, github, tmp_path: Path,
                                                               event_name: str) -> None:  # fmt: skip
    """The bot's github executor sends its dispatch to the local GitHub; act then runs the example workflow
    on the event GitHub makes of it, and the merge of the pinned adapter commit lands once."""
    workflow = "loraship-dispatch-cpu.yml"
    adapter_sha = hub.repos[ADAPTER].tags["v1.2"]
    repository = {"full_name": "octo/merges", "name": "merges", "owner": {"login": "octo"}, "default_branch": "main"}
    github.workflows[workflow] = 11
    if event_name == "workflow_dispatch":
        dispatch = bot_dispatch(github, hub.url, adapter_sha, {"workflow": workflow, "ref": "main"})
        event = {"inputs": dispatch["inputs"], "ref": f"refs/heads/{dispatch['ref']}",
                 "workflow": f".github/workflows/{workflow}", "repository": repository}  # fmt: skip
    else:
        dispatch = bot_dispatch(github, hub.url, adapter_sha, {"event_type": "loraship-merge"})
        assert dispatch["event_type"] == "loraship-merge"
        event = {"action": dispatch["event_type"], "client_payload": dispatch["client_payload"],
                 "repository": repository}  # fmt: skip
    repo, _ = user_repo(tmp_path, workflow, repository="octo/merges")
    run = act(repo, event_name, event, workflow=workflow, secrets={"HF_TOKEN": HF_TOKEN, "GITHUB_TOKEN": GH_TOKEN},
              env=endpoints(hub, github))  # fmt: skip
    assert run.job_result == "success", run.text + run.stderr
    (commit, _) = hub.commit_list(OUTPUT)
    assert commit.title.endswith(f"adapter {adapter_sha[:10]}]")
    assert hub.repos[OUTPUT].tags == {"v1.2": commit.oid}
    assert run.outputs()["status"] == "published" and run.outputs()["verified"] == "true"
    assert f"loraship published {hub.url}/{OUTPUT}/commit/{commit.oid}" in "\n".join(run.lines("1"))
    assert github.statuses == [] and github.releases == {}  # the adapter's commit is on the Hub
    assert_no_secret(run)
