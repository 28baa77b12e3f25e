"""The GitHub Action: ``python -m entrypoint`` run as the runner runs it, against a local Hub and a
local GitHub API; action.yml, the Dockerfile and the example workflows linted."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import GH_TOKEN, LLAMA, TOKENS

from loraship.tiny import build_adapter

ROOT = Path(__file__).resolve().parent.parent
EVENT_SHA = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class ActionRun:
    code: int
    stdout: str
    stderr: str
    outputs: dict[str, str]
    summary: str


@pytest.fixture
def seeded(hub_server, model_cache, tmp_path: Path) -> Path:
    """meta/base and alice/lora (tags v1.1 and v1.2) on the local Hub; returns the adapter folder."""
    base = tmp_path / "base"
    shutil.copytree(model_cache(LLAMA, tokenizer=True), base)
    hub_server.seed("meta/base", base)
    adapter = build_adapter(base, tmp_path / "adapter", target_modules=["q_proj", "v_proj"])
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "meta/base"}))
    hub_server.seed("alice/lora", adapter, tags=("v1.1",))
    other = build_adapter(base, tmp_path / "adapter-v2", target_modules=["q_proj"], seed=7)
    (other / "adapter_config.json").write_text(
        (adapter / "adapter_config.json").read_text().replace("v_proj", "q_proj")
    )
    hub_server.seed("alice/lora", other, tags=("v1.2",))
    return adapter


def run_action(tmp_path: Path, hub_server, github, inputs: dict[str, str], *, tag: str | None = "v1.2",  # type: ignore[no-untyped-def]
               env: dict[str, str] | None = None) -> ActionRun:  # fmt: skip
    workspace = tmp_path / "workspace"
    workspace.mkdir(exist_ok=True)
    output, summary, event = tmp_path / "github_output", tmp_path / "step_summary", tmp_path / "event.json"
    output.write_text("")
    summary.write_text("")
    ref = f"refs/tags/{tag}" if tag else "refs/heads/main"
    event.write_text(json.dumps({
        "ref": ref, "before": "0" * 40, "after": EVENT_SHA, "created": True, "deleted": False,
        "repository": {"full_name": "octo/trainer", "name": "trainer", "owner": {"login": "octo"}},
        "pusher": {"name": "octo"}, "sender": {"login": "octo"},
    }))  # fmt: skip
    extra, env = (
        env or {},
        {k: v for k, v in os.environ.items() if not k.startswith(("INPUT_", "GITHUB_", "HF_TOKEN", "HF_OIDC"))},
    )
    env.update(extra)
    env.update({
        "GITHUB_ACTIONS": "true", "GITHUB_WORKSPACE": str(workspace), "GITHUB_EVENT_NAME": "push",
        "GITHUB_EVENT_PATH": str(event), "GITHUB_REF": ref, "GITHUB_REF_TYPE": "tag" if tag else "branch",
        "GITHUB_REF_NAME": tag or "main", "GITHUB_SHA": EVENT_SHA, "GITHUB_REPOSITORY": "octo/trainer",
        "GITHUB_SERVER_URL": "https://github.test", "GITHUB_RUN_ID": "42", "GITHUB_API_URL": github.url,
        "GITHUB_OUTPUT": str(output), "GITHUB_STEP_SUMMARY": str(summary), "HF_ENDPOINT": hub_server.url,
    })  # fmt: skip
    env.update({f"INPUT_{name.upper()}": value for name, value in inputs.items()})  # hyphens kept, as the runner does
    proc = subprocess.run([sys.executable, "-m", "entrypoint"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300, check=False)  # fmt: skip
    outputs = parse_outputs(output.read_text())
    everything = proc.stdout + proc.stderr + output.read_text() + summary.read_text()
    for secret in (*TOKENS.values(), GH_TOKEN):
        assert secret not in everything.replace(f"::add-mask::{secret}", ""), "a token leaked"
    return ActionRun(proc.returncode, proc.stdout, proc.stderr, outputs, summary.read_text())


def parse_outputs(text: str) -> dict[str, str]:
    values, lines = {}, iter(text.splitlines())
    for line in lines:
        name, delimiter = line.split("<<", 1)
        value = []
        for inner in lines:
            if inner == delimiter:
                break
            value.append(inner)
        values[name] = "\n".join(value)
    return values


BASIC = {"adapter": "alice/lora", "output-repo": "alice/merged", "hf-token": TOKENS["alice"], "github-token": GH_TOKEN}


def test_tag_push_publishes_and_reports_back(seeded, hub_server, github, tmp_path: Path) -> None:
    run = run_action(tmp_path, hub_server, github, {**BASIC, "github-release": "true"})
    assert run.code == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    assert lines[:2] == [f"::add-mask::{TOKENS['alice']}", f"::add-mask::{GH_TOKEN}"]  # masked first
    groups = [line for line in lines if line.startswith("::group::")]
    assert groups == ["::group::Configure", "::group::Resolve", "::group::Fetch", "::group::Merge",
                      "::group::Verify", "::group::Publish"]  # fmt: skip
    # The tag names the adapter revision and the output tag.
    (commit, _) = hub_server.commit_list("alice/merged")
    tag_sha = hub_server.repos["alice/lora"].tags["v1.2"]
    assert commit.title.endswith(f"adapter {tag_sha[:10]}]")
    assert hub_server.repos["alice/merged"].tags == {"v1.2": commit.oid}
    assert run.outputs["status"] == "published"
    assert run.outputs["repo-url"] == f"{hub_server.url}/alice/merged"
    assert (run.outputs["commit-sha"], run.outputs["tag"], run.outputs["verified"]) == (commit.oid, "v1.2", "true")
    assert run.outputs["pr-url"] == ""
    assert run.outputs["report-path"] == "loraship-report.json"
    report = json.loads((tmp_path / "workspace" / "loraship-report.json").read_text())
    assert report["passed"] is True
    assert float(run.outputs["max-kl"]) == pytest.approx(report["outputs"]["stats"]["max_kl"], rel=1e-5)
    assert float(run.outputs["top1-agreement"]) == report["outputs"]["stats"]["top1"]
    assert run.summary.startswith(f"## loraship: published [alice/merged]({hub_server.url}/alice/merged)")
    assert "### loraship verification: passed" in run.summary
    assert f"::notice::Published {hub_server.url}/alice/merged/commit/{commit.oid}." in run.stdout
    # GitHub: a success status on the pushed commit, and the release with the report.
    (status,) = github.statuses
    assert (status["sha"], status["state"], status["context"]) == (EVENT_SHA, "success", "loraship")
    assert status["description"] == "published: alice/merged (verified)"
    assert status["target_url"] == f"{hub_server.url}/alice/merged/commit/{commit.oid}"
    (release,) = github.releases.values()
    assert (release["tag_name"], release["name"]) == ("v1.2", "v1.2: published: alice/merged (verified)")
    assert "### loraship verification: passed" in release["body"]
    (asset,) = github.assets.values()
    assert asset["name"] == "loraship-report.json" and json.loads(asset["data"])["passed"] is True
    # Again (a re-run of the workflow): nothing published; the release and its report stay as they are.
    again = run_action(tmp_path, hub_server, github, {**BASIC, "github-release": "true"})
    assert again.code == 0 and again.outputs["status"] == "already-published"
    assert again.outputs["commit-sha"] == commit.oid and len(hub_server.commit_list("alice/merged")) == 2
    assert list(github.releases.values()) == [release] and len(github.assets) == 1
    assert [s["state"] for s in github.statuses] == ["success", "success"]
    assert github.statuses[1]["description"] == "already published: alice/merged (not verified)"


@pytest.mark.slow
def test_inputs_with_underscores_config_and_explicit_revision(seeded, hub_server, github, tmp_path: Path) -> None:
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    (workspace / "loraship.yaml").write_text(
        "jobs:\n  main:\n    adapter: alice/lora\n    output: alice/from-config\n"
        "    verify:\n      generation_tokens: 4\n"
        "  other:\n    adapter: alice/lora\n    output: alice/other\n"
    )
    inputs = {"config": "loraship.yaml", "job": "main", "adapter-revision": "v1.1", "create-pr": "false",
              "tag": "release-1", "hf_token": TOKENS["alice"]}  # fmt: skip
    run = run_action(tmp_path, hub_server, github, inputs, tag=None)
    assert run.code == 0, run.stdout + run.stderr
    (commit, _) = hub_server.commit_list("alice/from-config")
    assert commit.title.endswith(f"adapter {hub_server.repos['alice/lora'].tags['v1.1'][:10]}]")  # adapter-revision
    assert hub_server.repos["alice/from-config"].tags == {"release-1": run.outputs["commit-sha"]}
    assert "alice/other" not in hub_server.repos
    assert github.statuses == []  # no github-token: nothing reported


def test_missing_token(seeded, hub_server, github, tmp_path: Path) -> None:
    run = run_action(tmp_path, hub_server, github, {**BASIC, "hf-token": ""})
    assert run.code == 1
    assert (
        "::error title=Bad input::Publishing to `alice/merged` needs a Hugging Face token, and the `hf-token` input "
        "is empty.%0AFix: Add `hf-token: ${{ secrets.HF_TOKEN }}` under `with:`, with a token that can write to the "
        "output repo (https://huggingface.co/settings/tokens), or publish without a stored secret: "
        "`hf-oidc-resource: <the output repo>` and `permissions: id-token: write` (trusted publishing)."
    ) in run.stdout
    assert run.summary.startswith("## loraship failed: Bad input\n\nPublishing to `alice/merged` needs")
    assert "**How to fix it:** Add `hf-token: ${{ secrets.HF_TOKEN }}`" in run.summary
    assert "alice/merged" not in hub_server.repos
    (status,) = github.statuses
    assert (status["state"], status["description"]) == ("failure", status["description"])
    assert status["description"].startswith("Bad input: Publishing to `alice/merged` needs a Hugging Face token")


def test_bad_repo_id(seeded, hub_server, github, tmp_path: Path) -> None:
    run = run_action(tmp_path, hub_server, github, {**BASIC, "output-repo": "my model"})
    assert run.code == 1
    assert (
        "::error title=Bad input::Input `output-repo`: 'my model' is neither a Hub repo id (`org/name`) nor "
        "`dir:PATH`.%0AFix: Set `output-repo:` to a repo id such as org/name."
    ) in run.stdout


def test_unknown_input_value(seeded, hub_server, github, tmp_path: Path) -> None:
    run = run_action(tmp_path, hub_server, github, {**BASIC, "dtype": "int8"})
    assert run.code == 1
    assert (
        "::error title=Bad input::Input `dtype` must be one of keep, bfloat16, float16, float32, got 'int8'."
        "%0AFix: Set `dtype:` to one of: keep, bfloat16, float16, float32."
    ) in run.stdout
    run = run_action(tmp_path, hub_server, github, {**BASIC, "private": "maybe"})
    assert "::error title=Bad input::Input `private` must be true or false, got 'maybe'." in run.stdout


def test_verification_failure(seeded, hub_server, github, tmp_path: Path) -> None:
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    (workspace / "strict.yaml").write_text("adapter: alice/lora\noutput: alice/merged\nverify:\n"
                                           "  max_error_ratio: 1.0e-30\n  generation_tokens: 4\n")  # fmt: skip
    inputs = {"config": "strict.yaml", "hf-token": TOKENS["alice"], "github-token": GH_TOKEN, "github-release": "true"}
    run = run_action(tmp_path, hub_server, github, inputs)
    assert run.code == 1
    assert (
        "::error title=Verification failed::The merged model does not match base + adapter: outputs: merge error / "
        "adapter effect.%0AFix: Do not publish it."
    ) in run.stdout
    assert "### loraship verification: FAILED" in run.summary
    assert (run.outputs["verified"], run.outputs["report-path"]) == ("false", "loraship-report.json")
    assert "alice/merged" not in hub_server.repos  # nothing published
    assert [s["state"] for s in github.statuses] == ["failure"] and github.releases == {}


@pytest.mark.slow
def test_bad_github_token_after_publishing_is_a_warning(seeded, hub_server, github, tmp_path: Path) -> None:
    """github-token defaults to the job's token, which may lack `statuses: write`: once the model is
    published, a GitHub failure must not fail the step (the model is out; the warning says what to fix)."""
    run = run_action(tmp_path, hub_server, github, {**BASIC, "github-token": "ghs_wrong"})
    assert run.code == 0, run.stdout + run.stderr
    assert run.outputs["status"] == "published"
    commit = hub_server.commit_list("alice/merged")[0].oid
    assert f"::warning title=GitHub error::Published {hub_server.url}/alice/merged/commit/{commit}; but " in run.stdout
    assert (
        "; but GitHub rejected the token while trying to read the repository octo/trainer "
        "(401 Bad credentials).%0AFix: Pass `github-token: ${{ secrets.GITHUB_TOKEN }}`"
    ) in run.stdout
    assert "::error" not in run.stdout


ID_TOKEN_ENV = {"ACTIONS_ID_TOKEN_REQUEST_TOKEN": "request-token-for-this-job"}


@pytest.mark.slow
def test_trusted_publishing_without_a_stored_token(seeded, hub_server, github, tmp_path: Path) -> None:
    hub_server.actions_oidc = ("request-token-for-this-job", "github-id-token-jwt")
    hub_server.trusted[("github-id-token-jwt", "alice/merged")] = "hf_oidc_short_lived_token"
    hub_server.add_user("hf_oidc_short_lived_token", "alice")
    inputs = {**BASIC, "hf-token": "", "hf-oidc-resource": "alice/merged"}
    env = {**ID_TOKEN_ENV, "ACTIONS_ID_TOKEN_REQUEST_URL": f"{hub_server.url}/_actions/id-token"}
    run = run_action(tmp_path, hub_server, github, inputs, env=env)
    assert run.code == 0, run.stdout + run.stderr
    assert "::add-mask::hf_oidc_short_lived_token" in run.stdout
    assert "Signed in by trusted publishing (a short-lived token scoped to `alice/merged`)." in run.stdout
    assert run.stdout.count("hf_oidc_short_lived_token") == 1  # only in the mask command
    assert run.outputs["status"] == "published"
    assert hub_server.repos["alice/merged"].tags == {"v1.2": hub_server.commit_list("alice/merged")[0].oid}


def test_trusted_publishing_refused_by_the_hub_is_a_clear_error(seeded, hub_server, github, tmp_path: Path) -> None:
    hub_server.actions_oidc = ("request-token-for-this-job", "github-id-token-jwt")  # no trusted publisher set up
    inputs = {**BASIC, "hf-token": "", "hf-oidc-resource": "alice/merged"}
    env = {**ID_TOKEN_ENV, "ACTIONS_ID_TOKEN_REQUEST_URL": f"{hub_server.url}/_actions/id-token"}
    run = run_action(tmp_path, hub_server, github, inputs, env=env)
    assert run.code == 1
    assert (
        "::error title=Hugging Face Hub error::Trusted publishing failed: the Hub did not exchange this job's OIDC "
        "token for a token scoped to `alice/merged` (No trusted publisher matches this token).%0AFix: On the Hub, add "
        "this GitHub repository and workflow as a trusted publisher of `alice/merged` (its Settings, Trusted "
        "publishers: https://huggingface.co/docs/hub/trusted-publishers), and give the job `permissions: id-token: "
        "write`; or use an `hf-token` instead."
    ) in run.stdout
    assert "alice/merged" not in hub_server.repos


def test_config_errors_are_annotated_with_file_and_line(seeded, hub_server, github, tmp_path: Path) -> None:
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    (workspace / "loraship.yaml").write_text("adapter: alice/lora\noutput: alice/merged\ndtyp: bfloat16\n")
    run = run_action(tmp_path, hub_server, github, {"config": "loraship.yaml", "hf-token": TOKENS["alice"]})
    assert run.code == 1
    assert "::error file=loraship.yaml,line=3,title=Invalid configuration::" in run.stdout


def test_a_bug_exits_70_with_the_versions(tmp_path: Path, monkeypatch, capsys) -> None:
    import io

    from entrypoint import action

    def broken(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise RuntimeError("boom")

    monkeypatch.setattr("loraship.run.pipeline.run", broken)
    out = io.StringIO()
    env = {"INPUT_ADAPTER": "./adapter", "INPUT_OUTPUT-REPO": "dir:./out", "GITHUB_WORKSPACE": str(tmp_path),
           "GITHUB_STEP_SUMMARY": str(tmp_path / "summary")}  # fmt: skip
    assert action.main(env, out) == 70
    assert "RuntimeError: boom" in out.getvalue()
    assert "::error title=loraship crashed (a bug)::An unexpected error stopped the action" in out.getvalue()


# --------------------------------------------------------------------------- action.yml, Dockerfile, workflows


def test_action_yml_declares_what_the_entrypoint_reads_and_writes() -> None:
    from entrypoint.action import INPUTS, result_outputs

    action = yaml.safe_load((ROOT / "action.yml").read_text())
    assert tuple(action["inputs"]) == INPUTS
    version = re.search(r'^version = "(.+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    assert version is not None
    # users pull the release's prebuilt image (never build it), tagged as image.yml pushes it
    assert action["runs"] == {"using": "docker", "image": f"docker://ghcr.io/your-org/loraship:v{version[1]}"}

    class Result:
        report, status, repo_url, commit_sha, tag, pr_url, verified = None, "published", "", "", "", "", None

    assert set(action["outputs"]) == set(result_outputs(Result(), ""))


def _tool(name: str) -> str:
    path = shutil.which(name) or str(Path(sys.executable).with_name(name))
    assert Path(path).exists(), f"{name} is installed by the dev extra"
    return path


def test_action_yml_is_valid_for_github() -> None:
    proc = subprocess.run([_tool("check-jsonschema"), "--builtin-schema", "vendor.github-actions", "action.yml"],
                          cwd=ROOT, capture_output=True, text=True, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_lints_clean() -> None:
    proc = subprocess.run([_tool("hadolint"), "Dockerfile"], cwd=ROOT, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_workflows_lint_clean() -> None:
    files = sorted((ROOT / "examples" / "workflows").glob("*.yml")) + sorted(
        (ROOT / ".github" / "workflows").glob("*.yml")
    )
    assert len(files) >= 3
    proc = subprocess.run([_tool("actionlint"), *map(str, files)], cwd=ROOT, capture_output=True, text=True,
                          check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_documented_image_tag_is_one_image_yml_pushes() -> None:
    """README, examples and action.yml pull `:vX.Y.Z` (or its `-cpu` twin), as image.yml tags them."""
    version = re.search(r'^version = "(.+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    assert version is not None
    texts = [ROOT / "README.md", ROOT / "action.yml", *sorted((ROOT / "examples").rglob("*.y*ml"))]
    tags = {m for p in texts for m in re.findall(r"ghcr\.io/your-org/loraship(?:-bot)?:([\w.-]+)", p.read_text())}
    assert tags and tags <= {f"v{version[1]}", f"v{version[1]}-cpu"}, tags


def test_a_workspace_file_named_entrypoint_cannot_run_instead(tmp_path: Path) -> None:
    """The image runs `python -P -m entrypoint` in the user's workspace: a workspace `entrypoint.py`
    must not shadow loraship's (PYTHONSAFEPATH keeps the working directory off sys.path)."""
    (tmp_path / "entrypoint.py").write_text("print('SHADOWED')\n")
    (tmp_path / "entrypoint").mkdir()
    (tmp_path / "entrypoint" / "__main__.py").write_text("print('SHADOWED')\n")
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["/usr/local/bin/python", "-P", "-m", "entrypoint"]' in dockerfile
    assert "PYTHONSAFEPATH=1" in dockerfile and "PYTHONPATH=/opt/loraship" in dockerfile
    action_stage = dockerfile.split("AS action\n")[1].split("\nFROM ")[0]
    assert "\nUSER " not in action_stage and "\nWORKDIR" not in dockerfile
    assert dockerfile.rstrip().endswith("\nFROM action")  # the default target is the action
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONSAFEPATH": "1", "GITHUB_WORKSPACE": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-P", "-m", "entrypoint"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, check=False)  # fmt: skip
    assert "SHADOWED" not in proc.stdout
    assert "::error" in proc.stdout  # loraship's entry ran: no adapter was given


def test_requantize_input_reaches_the_job(seeded, hub_server, github, tmp_path: Path) -> None:
    run = run_action(tmp_path, hub_server, github, {**BASIC, "requantize": "true"})  # the seeded base is not FP8
    assert run.code == 1
    assert (
        "::error title=Bad input::--requantize writes the merged weights back in the base's format; loraship "
        "requantizes block-scaled FP8 (float8_e4m3fn) only, and the base model "
    ) in run.stdout
    assert "alice/merged" not in hub_server.repos
    assert not any(path.endswith("/model.safetensors") for _, path in hub_server.requests)  # refused before
    run = run_action(tmp_path, hub_server, github, {**BASIC, "requantize": "maybe"})
    assert "::error title=Bad input::Input `requantize` must be true or false, got 'maybe'." in run.stdout
