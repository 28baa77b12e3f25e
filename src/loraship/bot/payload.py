"""Which Hub webhook deliveries trigger a merge. Pure: a body in, triggers (or why not) out.

A body is parsed as JSON bounded in nesting (``MAX_DEPTH``), every string in it must be Unicode text
(no lone surrogates: they cannot be stored, logged or answered in UTF-8), and the payload is then
parsed with huggingface_hub's ``WebhookPayload``; the fields the bot uses are checked up front: the
repo name against the Hub's repo-id rules, each updated ref against git's ``check-ref-format``
rules, each ``newSha`` is a commit SHA (40 hex digits, as the Hub sends them). Whatever fails is a
``BadPayload`` that names the field and what is wrong with it (the app answers 400).

A delivery triggers when its event scope is ``repo.content`` (commits, tags), the repo is a watched
model repo, and one of its ``updatedRefs`` is a new tag matching a rule's patterns, or a watched
branch moving.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from loraship.bot.config import BotConfig
from loraship.run.job import repo_id_problem as hub_repo_id_problem
from loraship.text import ref_problem, show

#: Deeper JSON is refused before it is parsed (a Hub payload nests 3 levels).
MAX_DEPTH = 64
#: A commit SHA as the Hub sends it in ``updatedRefs[].newSha`` (git's SHA-1 object names, lowercase).
_SHA = re.compile(r"[0-9a-f]{40}")
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = re.compile(r"[^\[\]{}]+")


class BadPayload(ValueError):
    """The body is not a Hub webhook delivery the bot can take: ``field`` is what is wrong (None: the body)."""

    def __init__(self, field: str | None, problem: str) -> None:
        super().__init__(f"`{field}`: {problem}" if field else problem)
        self.field, self.problem = field, problem


def parse_body(body: bytes) -> dict[str, Any]:
    """The JSON object in ``body`` (UTF-8), bounded in depth, every string in it Unicode text.

    Raises:
        BadPayload: Not UTF-8, not JSON, nested deeper than ``MAX_DEPTH``, not an object, or a string
            (a key or a value) that holds a lone surrogate.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadPayload(None, f"body is not JSON (not UTF-8: {e.reason} at byte {e.start})") from None
    if _depth(text) > MAX_DEPTH:
        raise BadPayload(None, f"body is nested deeper than {MAX_DEPTH} levels")
    try:
        data = json.loads(text)
    except RecursionError:  # the depth check counts what json would: this is a second line only
        raise BadPayload(None, f"body is nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as e:  # json.JSONDecodeError, and ints longer than Python converts
        raise BadPayload(None, f"body is not JSON ({e})") from None
    if not isinstance(data, dict):
        raise BadPayload(None, "body is not a JSON object")
    _check_text(data)
    return data


def _depth(text: str) -> int:
    """How deep the brackets of ``text`` nest, outside strings (stops counting past ``MAX_DEPTH``)."""
    brackets = _NOT_BRACKETS.sub("", _STRING.sub("", text))
    depth = deepest = 0
    for char in brackets:
        depth += 1 if char in "[{" else -1
        if depth > deepest:
            deepest = depth
            if deepest > MAX_DEPTH:
                break
    return deepest


def _check_text(value: Any, path: tuple[str | int, ...] = ()) -> None:
    """Every key and string value of ``value`` encodes as UTF-8 (no lone surrogates); the first that
    does not, in document order, is the one named. Recursive: ``parse_body`` bounded the depth."""
    if isinstance(value, str):
        _check_string(value, path, what="string")
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_string(key, (*path, key), what="key")
            _check_text(item, (*path, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_text(item, (*path, i))


def _check_string(value: str, path: Sequence[str | int], *, what: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = value[e.start].encode("utf-8", "backslashreplace").decode("ascii")
        raise BadPayload(
            field_name(path), f"the {what} holds a lone surrogate ({bad} at character {e.start + 1}), not Unicode text"
        ) from None


def field_name(path: Sequence[str | int]) -> str:
    """``updatedRefs.0.newSha``: a field's path, as pydantic's ``loc`` (printable in UTF-8)."""
    return ".".join(str(p).encode("utf-8", "backslashreplace").decode("utf-8") for p in path) or "(body)"


def repo_id_problem(name: str) -> str | None:
    """Why the Hub refuses ``name`` (``[namespace/]name``) as a repo id, or None: huggingface_hub's own rules
    (``validate_repo_id``, its reason without the name it echoes, which may be long or hostile), in ASCII
    only (its ``\\w`` would let Unicode letters through, the Hub does not)."""
    if not name.isascii():
        return "a character that is not ASCII"
    problem = hub_repo_id_problem(name)
    return None if problem is None else problem.split(": '", 1)[0].rstrip(".")


def _check_payload(payload: Any) -> None:
    """The fields the bot uses, checked before any is used (``payload``: a ``WebhookPayload``)."""
    problem = repo_id_problem(payload.repo.name)
    if problem is not None:
        raise BadPayload("repo.name", f"{show(payload.repo.name)} is not a Hub repo id (huggingface_hub: {problem})")
    for i, updated in enumerate(payload.updatedRefs or []):
        problem = ref_problem(updated.ref)
        if problem is not None:
            raise BadPayload(f"updatedRefs.{i}.ref", f"{show(updated.ref)} is not a git ref name (it has {problem})")
        sha = updated.newSha
        if sha and not _SHA.fullmatch(sha):  # None or "": no new commit (a deleted ref)
            raise BadPayload(f"updatedRefs.{i}.newSha", f"{show(sha)} is not a commit SHA (40 lowercase hex digits)")


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
        BadPayload: A field the bot uses is not what the Hub sends (see ``_check_payload``).
    """
    from huggingface_hub import WebhookPayload

    payload = WebhookPayload.model_validate(data)
    _check_payload(payload)
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
