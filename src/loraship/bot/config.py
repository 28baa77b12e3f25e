"""``bot.yaml``: which adapter repos to watch, what to do with them, and how to run the work.

The webhook secret comes from ``WEBHOOK_SECRET`` (huggingface_hub's convention), never from the
file; tokens too (``HF_TOKEN``, ``GITHUB_TOKEN``).
"""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator

from loraship.errors import ConfigError
from loraship.run.job import (
    REPO_ID_PATTERN,
    MergeJob,
    _Spec,
    check_repo_id,
    describe_errors,
    raise_problems,
    read_yaml,
)

_REPO = f"^{REPO_ID_PATTERN}$"
_FIX = "Correct the keys named above (examples/bot.yaml shows every key)."


class WatchRule(_Spec):
    """An adapter repo to watch, when to react, and the merge job to run."""

    adapter: str = Field(pattern=_REPO)
    tags: list[str] = Field(default_factory=lambda: ["*"])
    branches: list[str] = Field(default_factory=list)
    job: dict[str, Any]
    name: str | None = None

    @field_validator("adapter")
    @classmethod
    def _adapter(cls, value: str) -> str:
        return check_repo_id(value)

    def matches(self, kind: Literal["tag", "branch"], ref_name: str) -> bool:
        if kind == "tag":
            return any(fnmatch.fnmatchcase(ref_name, pattern) for pattern in self.tags)
        return ref_name in self.branches

    def merge_job(self, sha: str, *, tag: str | None) -> MergeJob:
        """The job for one trigger: the adapter pinned to the pushed commit; a pushed tag tags the output."""
        data = dict(self.job)
        publish = dict(data.get("publish") or {})
        if tag is not None and "tag" not in publish:
            publish["tag"] = tag
        data["publish"] = publish
        return MergeJob.model_validate({**data, "adapter": f"{self.adapter}@{sha}", "name": self.job_name})

    @property
    def job_name(self) -> str:
        return self.name or self.adapter.replace("/", "--")


class GitHubExecutor(_Spec):
    repository: str = Field(pattern=_REPO)
    workflow: str | None = None
    ref: str = "main"
    event_type: str | None = None


class HfJobsExecutor(_Spec):
    image: str
    flavor: str = "a10g-small"
    timeout: str = "2h"
    namespace: str | None = None


class ExecutorSpec(_Spec):
    kind: Literal["local", "github", "hf-jobs"] = "local"
    concurrency: int = Field(default=1, ge=1, le=32)
    workdir: str | None = None
    timeout_minutes: float = Field(default=360, gt=0)
    github: GitHubExecutor | None = None
    hf_jobs: HfJobsExecutor | None = None


class RetrySpec(_Spec):
    attempts: int = Field(default=3, ge=1, le=20)
    backoff_seconds: float = Field(default=30.0, ge=0)


class BotConfig(_Spec):
    """The whole bot.yaml."""

    watch: list[WatchRule] = Field(min_length=1)
    executor: ExecutorSpec = Field(default_factory=ExecutorSpec)
    retry: RetrySpec = Field(default_factory=RetrySpec)
    state: str = "loraship-bot.db"
    discussion_title: str = "loraship: merged models"
    max_body_bytes: int = Field(default=1_000_000, ge=1_000)
    read_timeout_seconds: float = Field(default=10.0, gt=0)
    max_connections: int = Field(default=200, ge=4)

    @field_validator("executor")
    @classmethod
    def _executor_settings(cls, value: ExecutorSpec) -> ExecutorSpec:
        if value.kind == "github" and (value.github is None or not (value.github.workflow or value.github.event_type)):
            raise ValueError("the github executor needs `github: {repository, workflow}` (or `event_type`)")
        if value.kind == "hf-jobs" and value.hf_jobs is None:
            raise ValueError("the hf-jobs executor needs `hf_jobs: {image}`")
        return value

    def rules_for(self, repo: str) -> list[tuple[int, WatchRule]]:
        return [(i, rule) for i, rule in enumerate(self.watch) if rule.adapter == repo]


_KNOWN = {
    (): sorted(BotConfig.model_fields),
    ("watch",): sorted(WatchRule.model_fields),
    ("executor",): sorted(ExecutorSpec.model_fields),
    ("executor", "github"): sorted(GitHubExecutor.model_fields),
    ("executor", "hf_jobs"): sorted(HfJobsExecutor.model_fields),
    ("retry",): sorted(RetrySpec.model_fields),
}


def load_bot_config(path: Path) -> BotConfig:
    """Read and validate bot.yaml, including every watched repo's job template.

    Raises:
        ConfigError: With the key and line of every problem.
    """
    data, lines = read_yaml(path, what="bot configuration", flag="--config", name="bot.yaml")
    if not isinstance(data, dict):
        raise ConfigError(f"`{path}` does not hold a mapping.", fix="Start it with `watch:` (see examples/bot.yaml).")
    try:
        config = BotConfig.model_validate(data)
    except ValidationError as e:
        raise_problems(path, describe_errors(e, (), lines, _KNOWN), fix=_FIX)
        raise AssertionError from e  # pragma: no cover - a ValidationError has at least one problem
    problems: list[str] = []
    for i, rule in enumerate(config.watch):
        try:
            rule.merge_job("0" * 40, tag=None)
        except ValidationError as e:
            problems.extend(
                f"{p} (in the job of watch entry {i + 1})" for p in describe_errors(e, ("watch", str(i), "job"), lines)
            )
    raise_problems(path, problems, fix=_FIX)
    return config
