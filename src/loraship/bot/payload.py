"""Which Hub webhook deliveries trigger a merge. Pure: a payload in, triggers (or why not) out.

Payloads are parsed with huggingface_hub's ``WebhookPayload``. A delivery triggers when its event
scope is ``repo.content`` (commits, tags), the repo is a watched model repo, and one of its
``updatedRefs`` is a new tag matching a rule's patterns, or a watched branch moving.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from loraship.bot.config import BotConfig


@dataclass(frozen=True)
class Trigger:
    """One merge to do: a repo's ref moved to ``sha``, matching watch rule ``rule``."""

    repo: str
    ref: str
    kind: Literal["tag", "branch"]
    name: str
    sha: str
    rule: int

    @property
    def key(self) -> str:
        """The same (repo, ref, newSha, rule) delivered twice is one job."""
        return f"{self.repo}|{self.ref}|{self.sha}|{self.rule}"


def find_triggers(data: Mapping[str, Any], config: BotConfig) -> tuple[list[Trigger], str | None]:
    """The merges a delivery asks for, or why it asks for none.

    Raises:
        pydantic.ValidationError: The body is not a Hub webhook payload.
    """
    from huggingface_hub import WebhookPayload

    payload = WebhookPayload.model_validate(data)
    if payload.event.scope != "repo.content":
        return [], f"event scope `{payload.event.scope}` is not `repo.content`"
    if payload.repo.type != "model":
        return [], f"`{payload.repo.name}` is a {payload.repo.type} repo, not a model repo"
    rules = config.rules_for(payload.repo.name)
    if not rules:
        return [], f"`{payload.repo.name}` is not watched"
    triggers: list[Trigger] = []
    for updated in payload.updatedRefs or []:
        if not updated.newSha or set(updated.newSha) == {"0"}:
            continue  # a deleted ref
        if updated.ref.startswith("refs/tags/"):
            kind: Literal["tag", "branch"] = "tag"
            name = updated.ref.removeprefix("refs/tags/")
        elif updated.ref.startswith("refs/heads/"):
            kind, name = "branch", updated.ref.removeprefix("refs/heads/")
        else:
            continue
        for index, rule in rules:
            if rule.matches(kind, name):
                triggers.append(Trigger(payload.repo.name, updated.ref, kind, name, updated.newSha, index))
    if not triggers:
        wanted = "; ".join(
            f"tags {', '.join(rule.tags) or '(none)'}, branches {', '.join(rule.branches) or '(none)'}"
            for _, rule in rules
        )
        return [], f"no updated ref of `{payload.repo.name}` matches the watch rules ({wanted})"
    return triggers, None
