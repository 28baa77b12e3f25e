"""Hostile bodies and odd deliveries: a 400 that says which field is wrong and how, never a 5xx, no job.

The Hub retries failed deliveries and then suspends the webhook: nothing a body holds may get a 500.
The app is served with real HTTP on 127.0.0.1, as in test_webhook.py.
"""

from __future__ import annotations

import copy
import json
import time
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from test_webhook import SECRET, Running, payload
from test_webhook import start_bot_once as start_bot_once  # a fixture: the one served bot of the module

from loraship.bot.config import BotConfig, WatchRule

NOT_A_SHA = "is not a commit SHA (40 lowercase hex digits)"


@pytest.fixture(scope="module")
def bot(start_bot_once: Running) -> Running:
    """One bot for this module, served as test_webhook serves it."""
    return start_bot_once


def _jobs(bot: Running) -> int:
    """How many jobs the queue holds (all of them: /jobs lists the newest 200)."""
    return sum(bot.bot.queue.counts().values())


def _refused(bot: Running, body: Any = None, *, raw: bytes | None = None) -> str:
    """Deliver ``body``; it must get a 400 and leave the queue as it was. Returns the reason."""
    before = _jobs(bot)
    response = bot.deliver(body, raw=raw)
    assert response.status_code == 400, response.text
    assert len(bot.client.get("/jobs").json()["jobs"]) == before == _jobs(bot)
    assert bot.client.get("/healthz").json()["status"] == "ok"
    return str(response.json()["error"])


@pytest.mark.parametrize("blank", [" ", "\n"])
def test_blank_new_sha_is_400(bot: Running, blank: str) -> None:
    assert _refused(bot, payload(sha=blank)) == (
        f"not a Hub webhook payload: `updatedRefs.0.newSha`: {blank!r} is not a commit SHA (40 lowercase hex digits)"
    )


def test_lone_surrogate_in_new_sha_is_400(bot: Running) -> None:
    body = payload()
    body["updatedRefs"][0]["newSha"] = "\ud800"
    assert _refused(bot, body) == (
        "not a Hub webhook payload: `updatedRefs.0.newSha`: the string holds a lone surrogate (\\ud800 at "
        "character 1), not Unicode text"
    )


def test_lone_surrogate_in_tag_is_400(bot: Running) -> None:
    assert _refused(bot, payload(ref="refs/tags/v1\ud800")) == (
        "not a Hub webhook payload: `updatedRefs.0.ref`: the string holds a lone surrogate (\\ud800 at "
        "character 13), not Unicode text"
    )


def test_lone_surrogate_in_repo_name_is_400(bot: Running) -> None:
    assert _refused(bot, payload(repo="alice/lora\ud800")) == (
        "not a Hub webhook payload: `repo.name`: the string holds a lone surrogate (\\ud800 at character 11), not "
        "Unicode text"
    )


def test_lone_surrogate_in_a_key_is_400(bot: Running) -> None:
    body = payload()
    body["repo"]["\udfff"] = 1
    assert _refused(bot, body) == (
        "not a Hub webhook payload: `repo.\\udfff`: the key holds a lone surrogate (\\udfff at character 1), not "
        "Unicode text"
    )


def test_new_sha_of_5000_characters_is_400(bot: Running) -> None:
    assert _refused(bot, payload(sha="a" * 5000)) == (
        f"not a Hub webhook payload: `updatedRefs.0.newSha`: {'a' * 60!r}… (5000 characters) {NOT_A_SHA}"
    )


@pytest.mark.parametrize("opening", ["[", '{"a":'])
def test_json_nested_100000_deep_is_400(bot: Running, opening: str) -> None:
    closing = "]" if opening == "[" else "}"
    raw = ('{"event": ' + opening * 100_000 + "1" + closing * 100_000 + "}").encode()
    assert _refused(bot, raw=raw) == "body is nested deeper than 64 levels"
    # Brackets inside strings are text, not nesting; 64 levels are fine.
    assert bot.deliver({**payload(), "x": "[" * 100_000}).status_code == 202
    assert bot.deliver({**payload(sha="c" * 40), "x": json.loads("[" * 60 + "]" * 60)}).status_code == 202


@pytest.mark.parametrize(
    ("sha", "shown"),
    [("A" * 40, repr("A" * 40)), ("a" * 39, repr("a" * 39)), ("g" * 40, repr("g" * 40)), ("", None)],
)
def test_new_sha_must_be_40_lowercase_hex_digits(bot: Running, sha: str, shown: str | None) -> None:
    if shown is None:  # no new commit: a deleted ref, ignored as before
        reply = bot.deliver(payload(sha=sha))
        assert (reply.status_code, reply.json()["status"]) == (200, "ignored")
        return
    assert _refused(bot, payload(sha=sha)) == (
        f"not a Hub webhook payload: `updatedRefs.0.newSha`: {shown} {NOT_A_SHA}"
    )


@pytest.mark.parametrize(
    ("ref", "problem"),
    [
        ("v1.0", "it does not start with `refs/`"),
        ("refs/tags/", "an empty part"),
        ("refs//tags/v1", "an empty part"),
        ("refs/tags/v1 0", "the character ' '"),
        ("refs/tags/v1\t0", "the control character '\\t'"),
        ("refs/tags/v1~1", "the character '~'"),
        ("refs/tags/v1^", "the character '^'"),
        ("refs/tags/v:1", "the character ':'"),
        ("refs/tags/v?", "the character '?'"),
        ("refs/tags/v*", "the character '*'"),
        ("refs/tags/v[1]", "the character '['"),
        ("refs/tags/v\\1", "the character '\\\\'"),
        ("refs/tags/v1..2", "`..`"),
        ("refs/tags/v@{1}", "`@{`"),
        ("refs/tags/v1.", "a `.` at the end"),
        ("refs/tags/.v1", "a part that starts with `.`"),
        ("refs/tags/v1.lock", "a part that ends with `.lock`"),
        ("refs/tags/v" + "1" * 255, "a part longer than 255 bytes"),
    ],
)
def test_refs_follow_git_check_ref_format(bot: Running, ref: str, problem: str) -> None:
    assert _refused(bot, payload(ref=ref)) == (
        f"not a Hub webhook payload: `updatedRefs.0.ref`: {ref[:60]!r}{'… (266 characters)' if len(ref) > 60 else ''} "
        f"is not a git ref name (it has {problem})"
    )


#: huggingface_hub's validate_repo_id reasons (without the name it echoes), which the bot answers with.
CHARS = (
    "Repo id must use alphanumeric chars, '-', '_' or '.'. The name cannot start or end with '-' or '.' and the "
    "maximum length is 96"
)


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("alice/lora/x", "Repo id must be in the form 'repo_name' or 'namespace/repo_name'"),
        ("alice/", CHARS),
        ("alice/" + "x" * 97, CHARS),
        ("alice/lоra", "a character that is not ASCII"),  # a Cyrillic о
        ("alice/lora x", CHARS),
        ("alice/-lora", CHARS),
        ("alice/lora.", CHARS),
        ("alice/lo--ra", "Cannot have -- or .. in repo_id"),
        ("alice/lo..ra", "Cannot have -- or .. in repo_id"),
        ("alice/lora.git", "Repo_id cannot end by '.git'"),
    ],
)
def test_repo_names_follow_the_hub_rules(bot: Running, name: str, problem: str) -> None:
    shown = f"{name[:60]!r}… ({len(name)} characters)" if len(name) > 60 else repr(name)
    assert _refused(bot, payload(repo=name)) == (
        f"not a Hub webhook payload: `repo.name`: {shown} is not a Hub repo id (huggingface_hub: {problem})"
    )


def test_valid_odd_refs_and_names_still_work(bot: Running) -> None:
    """What git and the Hub allow passes: no false 400s for real deliveries."""
    assert bot.deliver(payload(ref="refs/tags/v1.0-rc.1+build_7/ü", sha="d" * 40)).status_code == 202
    assert bot.deliver(payload(ref="refs/pr/3", sha="d" * 40)).json()["status"] == "ignored"
    assert bot.deliver(payload(repo="gpt2")).json() == {"status": "ignored", "reason": "`gpt2` is not watched"}
    assert bot.deliver(payload(repo="A_b.c/x-Y_z.1")).json()["status"] == "ignored"


def test_not_utf8_or_bad_numbers_are_400(bot: Running) -> None:
    assert _refused(bot, raw=b'{"a": "\xff"}') == "body is not JSON (not UTF-8: invalid start byte at byte 7)"
    reason = _refused(bot, raw=b'{"a": ' + b"1" * 10_000 + b"}")
    assert reason.startswith("body is not JSON (Exceeds the limit (4300 digits) for integer string conversion")
    assert _refused(bot, raw=b"[1]") == "body is not a JSON object"


def test_a_trigger_that_makes_no_job_is_400_and_nothing_is_queued(bot: Running, monkeypatch) -> None:
    """Checked at the bot's boundary: if one trigger of a delivery makes no valid job, none is queued."""
    original = WatchRule.merge_job

    def fails_for_v2(self: WatchRule, sha: str, *, tag: str | None) -> Any:
        if tag == "v2":
            raise OSError(36, "File name too long")
        return original(self, sha, tag=tag)

    monkeypatch.setattr(WatchRule, "merge_job", fails_for_v2)
    body = payload(sha="e" * 40)
    body["updatedRefs"].append({"ref": "refs/tags/v2", "oldSha": None, "newSha": "f" * 40})
    assert _refused(bot, body) == (
        f"`refs/tags/v2` at `{'f' * 40}` makes no valid merge job for watch entry 1 (OSError: [Errno 36] File name "
        "too long)"
    )


def test_content_length_that_is_not_ascii_digits_is_no_5xx(bot: Running) -> None:
    import socket

    port = int(bot.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"POST /webhook HTTP/1.1\r\nHost: x\r\nX-Webhook-Secret: " + SECRET.encode() +
                     b"\r\nContent-Length: \xb2\r\n\r\n")  # fmt: skip
        reply = sock.recv(200)
    assert not reply.startswith(b"HTTP/1.1 5"), reply
    assert bot.client.get("/healthz").json()["status"] == "ok"


# --------------------------------------------------------------------------- fuzz

_hostile_text = st.one_of(
    st.text(max_size=30),
    st.text(st.characters(exclude_categories=()), max_size=30),  # with lone surrogates
    st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1, max_size=3),
    st.sampled_from([" ", "\n", "", "\x00", "refs/tags/v1", "refs/heads/release", "a" * 40, "0" * 40, "gpt2"]),
    st.builds(lambda c, n: c * n, st.sampled_from(["a", "[", "\ud800", "é"]), st.sampled_from([41, 5_000, 300_000])),
)
_hostile_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | _hostile_text,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_hostile_text, children, max_size=4),
    max_leaves=12,
)
_fields = [("event",), ("event", "scope"), ("event", "action"), ("repo",), ("repo", "name"), ("repo", "type"),
           ("updatedRefs",), ("updatedRefs", 0), ("updatedRefs", 0, "ref"), ("updatedRefs", 0, "newSha"),
           ("webhook",), ("webhook", "version"), ("extra",)]  # fmt: skip


def _valid_delivery(draw: Any) -> dict[str, Any]:
    tag = draw(st.text(st.characters(min_codepoint=ord("0"), max_codepoint=ord("z"), categories=["L", "N"]),
                       min_size=1, max_size=12))  # fmt: skip
    sha = f"{draw(st.integers(min_value=1, max_value=16**40 - 1)):040x}"  # (all zeros: a deleted ref)
    return payload(ref=f"refs/tags/v{tag}", sha=sha)


def _replace(body: Any, path: tuple[str | int, ...], value: Any) -> None:
    """Set ``body[path]`` to ``value`` where the path still leads somewhere (an earlier change may have cut it)."""
    *parents, last = path
    for key in parents:
        if not _has(body, key):
            return
        body = body[key]
    if isinstance(body, dict) or _has(body, last):
        body[last] = value


def _has(container: Any, key: str | int) -> bool:
    if isinstance(container, dict):
        return key in container
    return isinstance(container, list) and isinstance(key, int) and key < len(container)


@st.composite
def _deliveries(draw: Any) -> tuple[bytes, bool]:
    """A body (raw bytes) and whether it is a valid delivery of a watched tag."""
    kind = draw(st.sampled_from(["valid", "mutated", "mutated", "random", "nested"]))
    if kind == "valid":
        return json.dumps(_valid_delivery(draw)).encode(), True
    if kind == "random":
        return json.dumps(draw(_hostile_json)).encode(), False
    if kind == "nested":
        depth = draw(st.integers(min_value=1, max_value=200_000))
        inner = draw(st.sampled_from([("[", "]"), ('{"k":', "}")]))
        return f'{{"event": {inner[0] * depth}null{inner[1] * depth}}}'.encode(), False
    body = copy.deepcopy(_valid_delivery(draw))
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        _replace(body, draw(st.sampled_from(_fields)), draw(_hostile_json))
    return json.dumps(body).encode(), False


#: The bot's default body limit: a larger body is refused (413) as soon as its Content-Length is read.
_MAX_BODY = BotConfig.model_fields["max_body_bytes"].default


def _deliver_fuzzed(bot: Running, raw: bytes) -> httpx.Response:
    """POST ``raw``. A body over the limit is answered 413 before it is read, and the server then closes the
    connection: a client still sending may see the reset instead of the answer; that is the refusal too."""
    try:
        return bot.deliver(None, raw=raw)
    except httpx.TransportError:
        if len(raw) <= _MAX_BODY:
            raise
        return httpx.Response(413, text="connection closed after the 413, before the body was sent")


@pytest.mark.timeout(120)
@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large, HealthCheck.large_base_example])  # fmt: skip
@given(delivery=_deliveries())
def test_fuzzed_deliveries_never_get_a_5xx_nor_a_second_job(bot: Running, delivery: tuple[bytes, bool]) -> None:
    raw, valid = delivery
    before = _jobs(bot)
    first = _deliver_fuzzed(bot, raw)
    event(f"status {first.status_code}")
    assert first.status_code in (200, 202, 400, 413), (first.status_code, first.text[:500])
    if valid:
        assert first.status_code == 202, first.text
    if first.status_code != 202:
        assert _jobs(bot) == before, first.text[:500]
    else:
        jobs = first.json()["jobs"]
        assert _jobs(bot) == before + sum(not job["duplicate"] for job in jobs) <= before + len(jobs)
        again = bot.deliver(None, raw=raw)  # the Hub redelivers: the same jobs, none new
        assert again.status_code == 202
        assert again.json()["jobs"] == [{"id": job["id"], "duplicate": True} for job in jobs]
        assert _jobs(bot) == before + sum(not job["duplicate"] for job in jobs)
    health = bot.client.get("/healthz")
    assert (health.status_code, health.json()["status"]) == (200, "ok")


def test_fuzz_leaves_the_bot_up(bot: Running) -> None:
    """After everything above (the module's bot is shared), /healthz is up and the queue works off its jobs."""
    deadline = time.time() + 30
    while bot.bot.queue.counts().get("queued", 0) + bot.bot.queue.counts().get("running", 0) and time.time() < deadline:
        time.sleep(0.1)
    counts = bot.bot.queue.counts()
    assert set(counts) <= {"succeeded"}, counts
    health = bot.client.get("/healthz")
    assert (health.status_code, health.json()["status"], health.json()["problems"]) == (200, "ok", [])
