"""Where the bot's merges run: ``local`` (a ``loraship run`` process per job), ``github`` (a
GitHub Actions workflow on a GPU runner, dispatched with PyGithub), or ``hf-jobs`` (the loraship
image on Hugging Face Jobs). The bot itself needs no GPU.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from loraship.errors import ConfigError, LorashipError
from loraship.spec import MergeJob
from loraship.webhook.config import BotConfig
from loraship.webhook.queue import Job


@dataclass(frozen=True)
class Outcome:
    """How a job ended, what to keep of it, and what to tell the adapter repo."""

    state: Literal["succeeded", "skipped"]
    result: dict[str, Any] = field(default_factory=dict)
    comment: str | None = None


class Executor(Protocol):
    def run(self, job: Job, merge_job: MergeJob) -> Outcome:
        """Carry out the job. Raises LorashipError (``transient`` when a retry may help)."""
        ...  # pragma: no cover


class LocalExecutor:
    """``loraship run`` in a child process: a crash or an out-of-memory kill cannot take the bot down."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir

    def run(self, job: Job, merge_job: MergeJob) -> Outcome:
        folder = self.workdir / job.id
        folder.mkdir(parents=True, exist_ok=True)
        config, result_path = folder / "job.yaml", folder / "result.json"
        config.write_text(merge_job.to_yaml())
        result_path.unlink(missing_ok=True)
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "loraship", "run", "--config", str(config), "--result", str(result_path),
                 "--quiet"],
                capture_output=True, text=True, env=dict(os.environ), check=False,
            )  # fmt: skip
            data = json.loads(result_path.read_text()) if result_path.is_file() else None
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        if proc.returncode == 0 and data and data.get("results"):
            result = data["results"][0]
            state: Literal["succeeded", "skipped"] = (
                "skipped" if result["status"] == "already-published" else "succeeded"
            )
            return Outcome(state, _summary(result), success_comment(job, result))
        if data and data.get("error"):
            e = data["error"]
            raise LorashipError(str(e["message"]), fix=e.get("fix"), transient=bool(e.get("transient")))
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        raise LorashipError(
            f"The merge process stopped without a result (exit code {proc.returncode}): {tail or 'no output'}",
            fix="See the bot's log; the job is retried while attempts remain.",
            transient=True,
        )


class GitHubActionsExecutor:
    """Dispatch the merge to a GitHub Actions workflow (or a repository_dispatch event)."""

    def __init__(self, config: BotConfig, token: str) -> None:
        from loraship.github import GitHub

        spec = config.executor.github
        assert spec is not None
        self.spec = spec
        self.github = GitHub(token, spec.repository)

    def run(self, job: Job, merge_job: MergeJob) -> Outcome:
        inputs = {"adapter": merge_job.adapter, "output": merge_job.output, "tag": merge_job.publish.tag or "",
                  "base": merge_job.base or ""}  # fmt: skip
        if self.spec.workflow:
            self.github.dispatch_workflow(self.spec.workflow, self.spec.ref, inputs)
            where = f"the GitHub Actions workflow `{self.spec.workflow}` of `{self.spec.repository}` ({self.spec.ref})"
        else:
            assert self.spec.event_type is not None
            self.github.dispatch_event(self.spec.event_type, {**inputs, "job": merge_job.model_dump(mode="json")})
            where = f"a `{self.spec.event_type}` repository_dispatch event of `{self.spec.repository}`"
        comment = (
            f"**loraship** sent the merge of `{job.repo}` at `{job.sha[:12]}` ({_trigger(job)}) to {where}; the "
            f"workflow publishes `{merge_job.output}` and reports there."
        )
        return Outcome("succeeded", {"dispatched": where}, comment)


class HfJobsExecutor:
    """Run the loraship image as a Hugging Face Job; the job's YAML goes in through the environment."""

    def __init__(self, config: BotConfig, hub: Any) -> None:
        spec = config.executor.hf_jobs
        assert spec is not None
        self.spec = spec
        self.hub = hub

    def run(self, job: Job, merge_job: MergeJob) -> Outcome:
        command = ["sh", "-c", 'printf "%s" "$LORASHIP_JOB" > /tmp/job.yaml && loraship run --config /tmp/job.yaml']
        env = {"LORASHIP_JOB": merge_job.to_yaml()}
        job_id, url = self.hub.run_job(image=self.spec.image, command=command, env=env, flavor=self.spec.flavor,
                                       timeout=self.spec.timeout, namespace=self.spec.namespace)  # fmt: skip
        comment = (
            f"**loraship** started the merge of `{job.repo}` at `{job.sha[:12]}` ({_trigger(job)}) as the Hugging "
            f"Face Job [{job_id}]({url}) ({self.spec.flavor}); it publishes `{merge_job.output}`."
        )
        return Outcome("succeeded", {"hf_job": job_id, "url": url}, comment)


def make_executor(config: BotConfig, *, hub: Any, env: dict[str, str], workdir: Path) -> Executor:
    """The executor bot.yaml names, with the tokens it needs from the environment.

    Raises:
        ConfigError: A token the executor needs is not set.
    """
    kind = config.executor.kind
    if kind == "github":
        token = env.get("GITHUB_TOKEN")
        if not token:
            raise ConfigError(
                "The github executor needs GITHUB_TOKEN, and it is not set.",
                fix="Set GITHUB_TOKEN to a token that may dispatch workflows (actions: write) of the repository.",
            )
        return GitHubActionsExecutor(config, token)
    if not env.get("HF_TOKEN"):
        raise ConfigError(
            f"The {kind} executor needs HF_TOKEN (to read adapters, publish and comment), and it is not set.",
            fix="Set HF_TOKEN to a token with write access to the output repos.",
        )
    if kind == "hf-jobs":
        return HfJobsExecutor(config, hub)
    return LocalExecutor(workdir)


def _trigger(job: Job) -> str:
    return f"tag `{job.ref.removeprefix('refs/tags/')}`" if job.ref.startswith("refs/tags/") else f"`{job.ref}`"


def _summary(result: dict[str, Any]) -> dict[str, Any]:
    keep = ("status", "output", "repo_url", "commit_sha", "tag", "pr_url", "verified", "base", "adapter", "message")
    return {k: result.get(k) for k in keep}


def success_comment(job: Job, result: dict[str, Any]) -> str | None:
    if result["status"] == "already-published":
        return None
    where = result.get("pr_url") or f"{result['repo_url']}/commit/{result['commit_sha']}"
    verified = {True: "verified against base + adapter", False: "NOT verified", None: "not verified"}[
        result["verified"]
    ]
    lines = [
        f"**loraship** merged `{job.repo}` at `{job.sha[:12]}` ({_trigger(job)}) into `{result['base']}` and published "
        f"[{result['output']}]({where}) ({verified}).",
    ]
    if result.get("report_markdown"):
        lines += ["", result["report_markdown"]]
    return "\n".join(lines)


def failure_comment(job: Job, error: LorashipError) -> str:
    text = f"**loraship** could not merge `{job.repo}` at `{job.sha[:12]}` ({_trigger(job)}): {error.message}"
    return text + (f"\n\n**How to fix it:** {error.fix}" if error.fix else "")
