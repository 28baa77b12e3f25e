"""Where the bot's merges run: ``local`` (a ``loraship run`` process per job), ``github`` (a
GitHub Actions workflow on a GPU runner, dispatched with PyGithub), or ``hf-jobs`` (the loraship
image on Hugging Face Jobs). The bot itself needs no GPU.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from loraship.bot.config import BotConfig
from loraship.bot.queue import Job
from loraship.errors import ConfigError, LorashipError
from loraship.run.job import MergeJob

log = logging.getLogger("loraship.bot")

BOT_ONLY_SECRETS = ("WEBHOOK_SECRET", "GITHUB_TOKEN", "GH_TOKEN")


@dataclass(frozen=True)
class Outcome:
    """How a job ended, what to keep of it, and what to tell the adapter repo."""

    state: Literal["succeeded", "skipped"]
    result: dict[str, Any] = field(default_factory=dict)
    comment: str | None = None
    recovered_comment: str | None = None  # for a skip: what to say if this job's own earlier attempt published


class Executor(Protocol):
    def run(self, job: Job, merge_job: MergeJob) -> Outcome:
        """Carry out the job. Raises LorashipError (``transient`` when a retry may help)."""
        ...  # pragma: no cover


class LocalExecutor:
    """``loraship run`` in a child process: a crash or an out-of-memory kill cannot take the bot down."""

    def __init__(self, workdir: Path, timeout_s: float = 6 * 3600) -> None:
        self.workdir = workdir
        self.timeout_s = timeout_s

    def run(self, job: Job, merge_job: MergeJob) -> Outcome:
        folder = self.workdir / job.id
        folder.mkdir(parents=True, exist_ok=True)
        config, result_path = folder / "job.yaml", folder / "result.json"
        config.write_text(merge_job.to_yaml())
        result_path.unlink(missing_ok=True)
        command = [sys.executable, "-m", "loraship", "run", "--config", str(config), "--result", str(result_path),
                   "--quiet"]  # fmt: skip
        try:
            try:
                proc = subprocess.run(command, capture_output=True, text=True, env=merge_env(os.environ),
                                      timeout=self.timeout_s, check=False)  # fmt: skip
            except subprocess.TimeoutExpired as e:
                raise LorashipError(
                    f"The merge ran longer than the executor's timeout ({self.timeout_s / 60:g} min) and was stopped.",
                    fix="Raise `executor.timeout_minutes` in bot.yaml, or run merges this large on a bigger machine.",
                ) from e
            data = _read_result(result_path)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        if proc.returncode == 0 and data and data.get("results"):
            result = data["results"][0]
            if result["status"] == "already-published":
                return Outcome("skipped", _summary(result), None, recovered_comment(job, result))
            return Outcome("succeeded", _summary(result), success_comment(job, result))
        if data and data.get("error"):
            err = data["error"]
            raise LorashipError(str(err["message"]), fix=err.get("fix"), transient=bool(err.get("transient")))
        # The traceback names this machine's paths: it goes to the bot's log, not into the comment.
        log.error("job %s: the merge process exited with %s:\n%s", job.id, proc.returncode, proc.stderr[-4000:])
        raise LorashipError(
            f"The merge process stopped without a result (exit code {proc.returncode}).",
            fix="The bot's log has the details; the job is retried while attempts remain.",
            transient=True,
        )


def merge_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The merge process's environment: the bot's, less the secrets only the bot needs."""
    return {k: v for k, v in environ.items() if k not in BOT_ONLY_SECRETS}


def _read_result(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


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
    if not (env.get("HF_TOKEN") or getattr(hub, "token", None)):
        raise ConfigError(
            f"The {kind} executor needs HF_TOKEN (to read adapters, publish and comment), and it is not set.",
            fix="Set HF_TOKEN (or sign in with `hf auth login`) with a token that has write access to the output "
            "repos.",
        )
    if kind == "hf-jobs":
        return HfJobsExecutor(config, hub)
    return LocalExecutor(workdir, config.executor.timeout_minutes * 60)


def _trigger(job: Job) -> str:
    return f"tag `{job.ref.removeprefix('refs/tags/')}`" if job.ref.startswith("refs/tags/") else f"`{job.ref}`"


def _summary(result: dict[str, Any]) -> dict[str, Any]:
    keep = ("status", "output", "repo_url", "commit_sha", "tag", "pr_url", "verified", "base", "adapter", "message")
    return {k: result.get(k) for k in keep}


def success_comment(job: Job, result: dict[str, Any]) -> str:
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


def recovered_comment(job: Job, result: dict[str, Any]) -> str:
    where = result.get("pr_url") or f"{result['repo_url']}/commit/{result['commit_sha']}"
    tag = f", tagged `{result['tag']}`" if result.get("tag") else ""
    return (
        f"**loraship** published [{result['output']}]({where}){tag} from `{job.repo}` at `{job.sha[:12]}` "
        f"({_trigger(job)}) into `{result['base']}`: an earlier attempt published it and was stopped before it "
        "could report here."
    )


def internal_error_comment(job: Job, error: Exception) -> str:
    return (
        f"**loraship** could not merge `{job.repo}` at `{job.sha[:12]}` ({_trigger(job)}): an internal error "
        f"({type(error).__name__}) stopped the bot's job.\n\n**How to fix it:** The bot's "
        "operator finds the details in its log; please report it to loraship."
    )


def failure_comment(job: Job, error: LorashipError) -> str:
    text = f"**loraship** could not merge `{job.repo}` at `{job.sha[:12]}` ({_trigger(job)}): {error.message}"
    return text + (f"\n\n**How to fix it:** {error.fix}" if error.fix else "")
