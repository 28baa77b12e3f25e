"""The Hub webhook bot: real HTTP to the running server on 127.0.0.1, the local Hub for the Hub side."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import LLAMA, TOKENS
from github_server import FakeGitHub
from hub_server import Fault, serve, stop
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loraship.bot.app import create_app, server_config
from loraship.bot.bot import Bot
from loraship.bot.config import BotConfig, load_bot_config
from loraship.bot.executors import Outcome, make_executor, merge_env
from loraship.bot.queue import JobQueue
from loraship.errors import ConfigError, LorashipError
from loraship.hub import Hub
from loraship.tiny import build_adapter

ROOT = Path(__file__).resolve().parents[2]
SECRET = "webhook-secret-for-tests"
GH_TOKEN = "ghs_bot_test_token_0123456789"


def payload(repo: str = "alice/lora", ref: str = "refs/tags/v1.0", sha: str = "a" * 40, *,
            scope: str = "repo.content", repo_type: str = "model") -> dict[str, Any]:  # fmt: skip
    """A Hub webhook delivery (version 3), as the Hub sends it for a new tag."""
    return {
        "event": {"action": "update", "scope": scope},
        "repo": {"type": repo_type, "name": repo, "id": "6543210", "private": False, "headSha": sha,
                 "url": {"web": f"https://huggingface.co/{repo}", "api": f"https://huggingface.co/api/models/{repo}"},
                 "owner": {"id": "1234"}, "tags": []},
        "updatedRefs": [{"ref": ref, "oldSha": None, "newSha": sha}],
        "webhook": {"id": "w-1", "version": 3},
    }  # fmt: skip


def config(**executor: Any) -> BotConfig:
    return BotConfig.model_validate({
        "watch": [{"adapter": "alice/lora", "tags": ["v*"], "branches": ["release"],
                   "job": {"output": "alice/merged", "verify": {"generation_tokens": 4}}}],
        "executor": {"kind": "local", **executor}, "retry": {"attempts": 2, "backoff_seconds": 0.2},
        "state": "unused.db",
    })  # fmt: skip


class Running:
    def __init__(self, bot: Bot, url: str) -> None:
        self.bot, self.url = bot, url
        self.client = httpx.Client(base_url=url, timeout=30, headers={"Authorization": f"Bearer {SECRET}"})

    def deliver(self, body: Any, *, secret: str | None = SECRET, raw: bytes | None = None) -> httpx.Response:
        headers = {"Content-Type": "application/json"}
        if secret is not None:
            headers["X-Webhook-Secret"] = secret
        return self.client.post("/webhook", content=raw if raw is not None else json.dumps(body), headers=headers)

    def wait(self, job_id: str, states: tuple[str, ...] = ("succeeded", "failed", "skipped"), timeout: float = 180):
        deadline = time.time() + timeout
        while time.time() < deadline:
            job = self.client.get(f"/jobs/{job_id}").json()
            if job["state"] in states:
                return job
            time.sleep(0.1)
        raise AssertionError(f"job {job_id} still {job['state']}")


@pytest.fixture
def start_bot(tmp_path: Path):  # type: ignore[no-untyped-def]
    started: list[tuple[Any, Any, Bot, JobQueue]] = []

    def start(cfg: BotConfig, executor: Any, hub: Any = None) -> Running:
        queue = JobQueue(tmp_path / f"bot{len(started)}.db")
        bot = Bot(cfg, queue, executor, hub)
        bot.start()
        url, server, thread = serve(create_app(bot, SECRET))
        started.append((server, thread, bot, queue))
        return Running(bot, url)

    yield start
    for server, thread, bot, queue in started:
        stop(server, thread)
        bot.stop()
        queue.close()


class Recording:
    """An executor that records what it is asked to run (for tests of the HTTP side only)."""

    def __init__(self) -> None:
        self.runs: list[str] = []

    def run(self, job: Any, merge_job: Any) -> Outcome:
        self.runs.append(job.key)
        return Outcome("succeeded", {"adapter": merge_job.adapter})


# --------------------------------------------------------------------------- HTTP side


def test_secret_missing_wrong_right(start_bot) -> None:
    bot = start_bot(config(), Recording())
    missing = bot.deliver(payload(), secret=None)
    assert (missing.status_code, missing.json()) == (401, {"error": "missing X-Webhook-Secret header"})
    wrong = bot.deliver(payload(), secret="guess")
    assert (wrong.status_code, wrong.json()) == (403, {"error": "wrong webhook secret"})
    right = bot.deliver(payload())
    (job,) = right.json()["jobs"]
    assert (right.status_code, right.json()["status"], job["duplicate"]) == (202, "accepted", False)


def test_bad_bodies_get_400_or_413(start_bot) -> None:
    bot = start_bot(config(), Recording())
    r = bot.deliver(None, raw=b"{not json")
    assert r.status_code == 400 and r.json()["error"].startswith("body is not JSON (")
    assert bot.deliver([1, 2]).json() == {"error": "body is not a JSON object"}
    r = bot.deliver({"event": {"action": "update", "scope": "repo.content"}})
    assert r.status_code == 400 and r.json() == {"error": "not a Hub webhook payload: `repo`: Field required"}
    broken = payload()
    broken["repo"]["type"] = 7
    assert bot.deliver(broken).status_code == 400
    r = bot.deliver(None, raw=b"[" + b"1," * 600_000 + b"1]")
    assert r.status_code == 413 and r.json() == {"error": "body larger than 1000000 bytes"}


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)


@st.composite
def mangled_payloads(draw: Any) -> Any:
    """Random JSON, or a real payload with one part replaced by random JSON."""
    if draw(st.booleans()):
        return draw(json_values)
    body = payload()
    section = draw(st.sampled_from(["event", "repo", "updatedRefs", "webhook"]))
    body[section] = draw(json_values)
    return body


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=mangled_payloads())
def test_random_payloads_get_4xx_or_ignored_never_500(start_bot_once, body: Any) -> None:
    response = start_bot_once.deliver(body)
    assert response.status_code in (200, 202, 400), response.text
    assert start_bot_once.client.get("/healthz").json()["status"] == "ok"


@pytest.fixture(scope="module")
def start_bot_once(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    queue = JobQueue(tmp_path_factory.mktemp("bot") / "bot.db")
    bot = Bot(config(), queue, Recording(), None)
    bot.start()
    url, server, thread = serve(create_app(bot, SECRET))
    yield Running(bot, url)
    stop(server, thread)
    bot.stop()
    queue.close()


def test_ignored_events_say_why(start_bot) -> None:
    bot = start_bot(config(), Recording())
    cases = [
        (payload(scope="repo.config"), "event scope `repo.config` is not `repo.content`"),
        (payload(repo="carol/other"), "`carol/other` is not watched"),
        (payload(repo_type="dataset"), "`alice/lora` is a dataset repo, not a model repo"),
        (payload(ref="refs/tags/nightly"),
         "no updated ref of `alice/lora` matches the watch rules (tags v*, branches release)"),
        (payload(ref="refs/heads/main"),
         "no updated ref of `alice/lora` matches the watch rules (tags v*, branches release)"),
        (payload(sha="0" * 40), "no updated ref of `alice/lora` matches the watch rules (tags v*, branches release)"),
    ]  # fmt: skip
    for body, reason in cases:
        r = bot.deliver(body)
        assert (r.status_code, r.json()) == (200, {"status": "ignored", "reason": reason})
    assert bot.deliver(payload(ref="refs/heads/release")).status_code == 202  # a watched branch moving
    assert bot.deliver(payload(ref="refs/tags/v2.0-rc1")).status_code == 202  # v* matches


def test_slow_clients_are_cut_off_and_the_bot_keeps_answering(tmp_path: Path) -> None:
    """Half-sent headers and bodies (more than the connection limit): 408 or closed after the read timeout."""
    import socket

    cfg = BotConfig.model_validate({**config().model_dump(), "read_timeout_seconds": 1, "max_connections": 20})
    queue = JobQueue(tmp_path / "bot.db")
    bot = Bot(cfg, queue, Recording(), None)
    app = create_app(bot, SECRET)
    url, server, thread = serve(app, server_config(app, cfg, host="127.0.0.1", port=0))
    port = int(url.rsplit(":", 1)[1])
    slow_body = b"POST /webhook HTTP/1.1\r\nHost: x\r\nX-Webhook-Secret: " + SECRET.encode() + \
        b"\r\nContent-Length: 100\r\n\r\n{"  # fmt: skip
    sockets = []
    try:
        for i in range(40):
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(slow_body if i % 2 == 0 else b"GET /healthz HTTP/1.1\r\nHo")
            sockets.append(sock)
            if i == 1:  # these two are read before the others take every connection slot
                time.sleep(0.3)
        deadline = time.time() + 15
        while time.time() < deadline:
            if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                break
            time.sleep(0.2)
        else:
            raise AssertionError("/healthz did not recover from slow clients")
        sockets[0].settimeout(5)
        assert sockets[0].recv(100).startswith(b"HTTP/1.1 408 Request Timeout")
        sockets[1].settimeout(5)
        assert sockets[1].recv(100) == b""  # half a header: closed without a reply
    finally:
        for sock in sockets:
            sock.close()
        stop(server, thread)
        queue.close()


def test_redelivery_is_one_job(start_bot) -> None:
    recording = Recording()
    bot = start_bot(config(), recording)
    first = bot.deliver(payload()).json()["jobs"][0]
    again = bot.deliver(payload()).json()["jobs"][0]
    assert again == {"id": first["id"], "duplicate": True}
    bot.wait(first["id"])
    assert len(recording.runs) == 1 and len(bot.client.get("/jobs").json()["jobs"]) == 1


def test_200_concurrent_deliveries_a_third_duplicates(start_bot, tmp_path: Path) -> None:
    github = FakeGitHub(token=GH_TOKEN)
    url, server, thread = serve(github.app())
    github.url = url
    try:
        cfg = BotConfig.model_validate({
            **config().model_dump(), "executor": {"kind": "github", "concurrency": 4,
                                                  "github": {"repository": "octo/merges", "workflow": "merge.yml"}},
        })  # fmt: skip
        os.environ["GITHUB_API_URL"] = url
        executor = make_executor(cfg, hub=None, env={"GITHUB_TOKEN": GH_TOKEN}, workdir=tmp_path)
        bot = start_bot(cfg, executor)
        unique = [payload(sha=f"{i:040x}") for i in range(1, 135)]  # (all zeros would be a deleted ref)
        deliveries = unique + unique[:66]  # 200 deliveries, 66 of them repeats
        with ThreadPoolExecutor(32) as pool:
            responses = list(pool.map(bot.deliver, deliveries))
        assert all(r.status_code == 202 for r in responses)
        ids = {r.json()["jobs"][0]["id"] for r in responses}
        assert len(ids) == 134
        for job_id in ids:
            assert bot.wait(job_id)["state"] == "succeeded"
        adapters = [d["inputs"]["adapter"] for d in github.dispatches]
        assert sorted(adapters) == sorted(f"alice/lora@{i:040x}" for i in range(1, 135))  # none lost, none twice
    finally:
        os.environ.pop("GITHUB_API_URL", None)
        stop(server, thread)


# --------------------------------------------------------------------------- the work itself


@pytest.fixture
def seeded(hub_server, model_cache, tmp_path: Path, monkeypatch) -> str:
    """meta/base and alice/lora (tag v1.0) on the local Hub; HF_* point at it. Returns the tag's SHA."""
    base = tmp_path / "base"
    shutil.copytree(model_cache(LLAMA, tokenizer=True), base)
    hub_server.seed("meta/base", base)
    adapter = build_adapter(base, tmp_path / "adapter", target_modules=["q_proj"])
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": "meta/base"}))
    sha = hub_server.seed("alice/lora", adapter, tags=("v1.0",))
    monkeypatch.setenv("HF_ENDPOINT", hub_server.url)
    monkeypatch.setenv("HF_TOKEN", TOKENS["alice"])
    return sha


def test_tag_push_merges_publishes_and_comments(seeded, hub_server, start_bot, tmp_path: Path) -> None:
    hub = Hub(token=TOKENS["alice"], endpoint=hub_server.url)
    executor = make_executor(config(), hub=hub, env=dict(os.environ), workdir=tmp_path / "work")
    bot = start_bot(config(), executor, hub)
    (job,) = bot.deliver(payload(sha=seeded)).json()["jobs"]
    done = bot.wait(job["id"])
    assert done["state"] == "succeeded", done["error"]
    (commit, _) = hub_server.commit_list("alice/merged")
    assert hub_server.repos["alice/merged"].tags == {"v1.0": commit.oid}
    assert done["result"]["commit_sha"] == commit.oid and done["result"]["verified"] is True
    assert done["job"]["adapter"] == f"alice/lora@{seeded}"
    (discussion,) = hub_server.repos["alice/lora"].discussions
    assert discussion.title == "loraship: merged models"
    comment = discussion.events[0]["data"]["latest"]["raw"]
    assert comment.startswith(f"**loraship** merged `alice/lora` at `{seeded[:12]}` (tag `v1.0`) into `meta/base@")
    assert "(verified against base + adapter)." in comment and "### loraship verification: passed" in comment
    listing = bot.client.get("/jobs").text + comment
    assert all(token not in listing for token in TOKENS.values())
    # The same tag delivered again later: the same job, nothing new.
    assert bot.deliver(payload(sha=seeded)).json()["jobs"][0] == {"id": job["id"], "duplicate": True}


def test_failure_is_reported_and_not_retried(seeded, hub_server, start_bot, tmp_path: Path) -> None:
    cfg = BotConfig.model_validate({**config().model_dump(), "watch": [
        {"adapter": "alice/lora", "tags": ["v*"], "job": {"output": "bob/merged"}}]})  # fmt: skip
    hub = Hub(token=TOKENS["alice"], endpoint=hub_server.url)
    bot = start_bot(cfg, make_executor(cfg, hub=hub, env=dict(os.environ), workdir=tmp_path / "w"), hub)
    (job,) = bot.deliver(payload(sha=seeded)).json()["jobs"]
    done = bot.wait(job["id"])
    assert (done["state"], done["attempts"]) == ("failed", 1)
    comment = hub_server.repos["alice/lora"].discussions[0].events[0]["data"]["latest"]["raw"]
    assert comment == (
        f"**loraship** could not merge `alice/lora` at `{seeded[:12]}` (tag `v1.0`): `alice` cannot publish "
        "`bob/merged`: the namespace `bob` is neither this account nor one of its organizations (team).\n\n"
        "**How to fix it:** Publish to `alice/merged` (or an organization you belong to), or use a token of a member "
        "of `bob`."
    )
    assert "bob/merged" not in hub_server.repos


def test_transient_failures_are_retried_with_backoff(start_bot) -> None:
    class Flaky:
        calls = 0

        def run(self, job: Any, merge_job: Any) -> Outcome:
            Flaky.calls += 1
            if Flaky.calls == 1:
                raise LorashipError("The Hub answered 503.", transient=True)
            return Outcome("succeeded")

    bot = start_bot(config(), Flaky())
    (job,) = bot.deliver(payload()).json()["jobs"]
    done = bot.wait(job["id"])
    assert (done["state"], done["attempts"], Flaky.calls) == ("succeeded", 2, 2)

    class Down:
        def run(self, job: Any, merge_job: Any) -> Outcome:
            raise LorashipError("The Hub answered 503.", transient=True)

    bot = start_bot(config(), Down())
    (job,) = bot.deliver(payload()).json()["jobs"]
    done = bot.wait(job["id"])
    assert (done["state"], done["attempts"], done["error"]) == ("failed", 2, "The Hub answered 503.")


def _comments(hub_server: Any, repo: str = "alice/lora") -> list[str]:
    return [e["data"]["latest"]["raw"] for d in hub_server.repos[repo].discussions for e in d.events]


def test_a_dropped_connection_or_bad_json_while_commenting_is_retried(start_bot, hub_server, tmp_path: Path) -> None:
    hub_server.seed("alice/lora", tmp_path)
    hub = Hub(token=TOKENS["alice"], endpoint=hub_server.url)
    hub_server.faults += [Fault("GET", "/alice/lora/discussions", "drop"),
                          Fault("GET", "/alice/lora/discussions", "bad-json")]  # fmt: skip

    class Publishes:
        def run(self, job: Any, merge_job: Any) -> Outcome:
            return Outcome("succeeded", {"n": 1}, f"published {job.ref}")

    bot = start_bot(config(), Publishes(), hub)
    (first,) = bot.deliver(payload(ref="refs/tags/v1")).json()["jobs"]
    done = bot.wait(first["id"])
    assert (done["state"], done["result"]) == ("succeeded", {"n": 1})
    assert _comments(hub_server) == ["published refs/tags/v1"]
    # The Hub keeps failing: the job is still done (it published), the report's failure is on record.
    hub_server.faults += [Fault("GET", "/alice/lora/discussions", "drop") for _ in range(3)]
    (second,) = bot.deliver(payload(ref="refs/tags/v2", sha="b" * 40)).json()["jobs"]
    done = bot.wait(second["id"])
    assert done["state"] == "succeeded"
    assert done["result"] == {"n": 1, "comment_error": f"Cannot reach the Hub at {hub_server.url} to comment on "
                                                       "`alice/lora`: RemoteProtocolError."}  # fmt: skip
    assert bot.client.get("/healthz").json()["status"] == "ok"


def test_a_crashing_executor_is_recorded_and_the_queue_goes_on(start_bot, hub_server, tmp_path: Path) -> None:
    hub_server.seed("alice/lora", tmp_path)
    hub = Hub(token=TOKENS["alice"], endpoint=hub_server.url)

    class Crashes:
        def run(self, job: Any, merge_job: Any) -> Outcome:
            if job.ref.endswith("v1"):
                raise KeyError("/home/runner/secret/path.py")
            return Outcome("succeeded")

    bot = start_bot(config(), Crashes(), hub)
    (first,) = bot.deliver(payload(ref="refs/tags/v1")).json()["jobs"]
    (second,) = bot.deliver(payload(ref="refs/tags/v2", sha="b" * 40)).json()["jobs"]
    assert bot.wait(second["id"])["state"] == "succeeded"
    done = bot.wait(first["id"])
    assert (done["state"], done["error"]) == ("failed", "internal error: KeyError: '/home/runner/secret/path.py'")
    assert _comments(hub_server) == [
        f"**loraship** could not merge `alice/lora` at `{'a' * 12}` (tag `v1`): an internal error (KeyError) stopped "
        "the bot's job.\n\n**How to fix it:** The bot's operator finds the details in its log; please report it to "
        "loraship."
    ]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the worker's death is the point
def test_healthz_reports_dead_and_stuck_workers(start_bot) -> None:
    class Exits:
        def run(self, job: Any, merge_job: Any) -> Outcome:
            raise SystemExit(3)  # a library that calls sys.exit: the worker thread ends

    bot = start_bot(config(), Exits())
    assert bot.client.get("/healthz").json()["problems"] == []
    bot.deliver(payload())
    deadline = time.time() + 10
    while bot.client.get("/healthz").status_code == 200 and time.time() < deadline:
        time.sleep(0.05)
    reply = bot.client.get("/healthz")
    assert (reply.status_code, reply.json()["status"]) == (503, "unhealthy")
    assert reply.json()["problems"] == ["worker loraship-worker-0 has stopped"]

    class Hangs:
        def run(self, job: Any, merge_job: Any) -> Outcome:
            time.sleep(3)
            return Outcome("succeeded")

    cfg = BotConfig.model_validate({**config().model_dump(), "executor": {"timeout_minutes": 0.01}})  # 1.5 x 0.6 s
    bot = start_bot(cfg, Hangs())
    (job,) = bot.deliver(payload()).json()["jobs"]
    time.sleep(1.5)
    reply = bot.client.get("/healthz")
    assert reply.status_code == 503
    (problem,) = reply.json()["problems"]
    assert problem.startswith(f"worker loraship-worker-0 has run job {job['id']} for ")
    assert bot.wait(job["id"])["state"] == "succeeded"
    assert bot.client.get("/healthz").status_code == 200


def test_merge_process_gets_no_bot_secrets() -> None:
    env = {"PATH": "/bin", "HF_TOKEN": "hf_x", "WEBHOOK_SECRET": "s", "GITHUB_TOKEN": "g", "GH_TOKEN": "h"}
    assert merge_env(env) == {"PATH": "/bin", "HF_TOKEN": "hf_x"}


def test_github_executor_dispatches_the_workflow(start_bot, hub_server, tmp_path: Path) -> None:
    github = FakeGitHub(token=GH_TOKEN)
    url, server, thread = serve(github.app())
    github.url = url
    os.environ["GITHUB_API_URL"] = url
    try:
        github_spec = {"repository": "octo/merges", "workflow": "merge.yml", "ref": "main"}
        cfg = BotConfig.model_validate({**config().model_dump(), "executor": {"kind": "github", "github": github_spec}})
        hub_server.seed("alice/lora", tmp_path)  # an (empty) repo to comment on
        hub = Hub(token=TOKENS["alice"], endpoint=hub_server.url)
        bot = start_bot(cfg, make_executor(cfg, hub=hub, env={"GITHUB_TOKEN": GH_TOKEN}, workdir=tmp_path), hub)
        (job,) = bot.deliver(payload(ref="refs/tags/v3")).json()["jobs"]
        assert bot.wait(job["id"])["state"] == "succeeded"
        (dispatch,) = github.dispatches
        assert dispatch == {"kind": "workflow", "repo": "octo/merges", "workflow_id": 7, "ref": "main",
                            "inputs": {"adapter": f"alice/lora@{'a' * 40}", "output": "alice/merged", "tag": "v3",
                                       "base": ""}}  # fmt: skip
        comment = hub_server.repos["alice/lora"].discussions[0].events[0]["data"]["latest"]["raw"]
        assert "the GitHub Actions workflow `merge.yml` of `octo/merges` (main)" in comment
    finally:
        os.environ.pop("GITHUB_API_URL", None)
        stop(server, thread)


def test_github_executor_unreachable_is_retried_then_reported(start_bot, hub_server, tmp_path: Path,
                                                              monkeypatch) -> None:  # fmt: skip
    closed = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    monkeypatch.setenv("GITHUB_API_URL", closed)
    github_spec = {"repository": "octo/merges", "workflow": "merge.yml", "ref": "main"}
    cfg = BotConfig.model_validate({**config().model_dump(), "executor": {"kind": "github", "github": github_spec}})
    hub_server.seed("alice/lora", tmp_path)
    hub = Hub(token=TOKENS["alice"], endpoint=hub_server.url)
    bot = start_bot(cfg, make_executor(cfg, hub=hub, env={"GITHUB_TOKEN": GH_TOKEN}, workdir=tmp_path), hub)
    (job,) = bot.deliver(payload()).json()["jobs"]
    done = bot.wait(job["id"])
    assert (done["state"], done["attempts"]) == ("failed", 2)
    assert _comments(hub_server) == [
        f"**loraship** could not merge `alice/lora` at `{'a' * 12}` (tag `v1.0`): Cannot reach GitHub at {closed} to "
        "read the repository octo/merges: ConnectionError.\n\n**How to fix it:** Check the network (and "
        "GITHUB_API_URL), then run again."
    ]


def test_hf_jobs_executor_starts_a_job(start_bot, hub_server, tmp_path: Path) -> None:
    cfg = BotConfig.model_validate({**config().model_dump(), "executor": {
        "kind": "hf-jobs", "hf_jobs": {"image": "ghcr.io/octo/loraship:0.1.0", "flavor": "l4x1"}}})  # fmt: skip
    hub_server.seed("alice/lora", tmp_path)
    hub = Hub(token=TOKENS["alice"], endpoint=hub_server.url)
    bot = start_bot(cfg, make_executor(cfg, hub=hub, env={"HF_TOKEN": TOKENS["alice"]}, workdir=tmp_path), hub)
    (job,) = bot.deliver(payload()).json()["jobs"]
    done = bot.wait(job["id"])
    assert done["state"] == "succeeded"
    (started,) = hub_server.jobs.values()
    assert (started["dockerImage"], started["flavor"], started["secrets"]) == ("ghcr.io/octo/loraship:0.1.0",
                                                                               "l4x1", ["HF_TOKEN"])  # fmt: skip
    assert started["_secrets"] == {"HF_TOKEN": TOKENS["alice"]}  # the token travels as a secret, not in env
    assert f"adapter: alice/lora@{'a' * 40}" in started["environment"]["LORASHIP_JOB"]
    assert done["result"]["hf_job"] == started["id"]
    assert TOKENS["alice"] not in json.dumps(started["environment"])


@pytest.mark.slow
@pytest.mark.parametrize("step", ["merging", "while committing", "between commit and tag"])
def test_killed_bot_is_picked_up_after_restart_and_reports_once(seeded, hub_server, tmp_path: Path, step: str) -> None:
    """kill -9 the bot (and its merge) in the middle of a job; restart: published, tagged and reported once."""
    bot_yaml = tmp_path / "bot.yaml"
    bot_yaml.write_text(
        "state: bot.db\nretry:\n  attempts: 3\n  backoff_seconds: 0.1\nwatch:\n  - adapter: alice/lora\n"
        "    tags: ['v*']\n    job:\n      output: alice/merged\n      verify:\n        generation_tokens: 4\n"
    )
    env = {**os.environ, "WEBHOOK_SECRET": SECRET}

    def start(port: int) -> subprocess.Popen[str]:
        proc = subprocess.Popen([sys.executable, "-m", "loraship", "serve", "--config", str(bot_yaml), "--port",
                                 str(port)], cwd=tmp_path, env=env, start_new_session=True, text=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                    return proc
            except httpx.TransportError:
                time.sleep(0.1)
        raise AssertionError("the bot did not start")

    port = _free_port()
    proc = start(port)
    running = Running(None, f"http://127.0.0.1:{port}")  # type: ignore[arg-type]
    if step == "between commit and tag":  # the Hub kills the bot when the tag request arrives
        hub_server.faults.append(Fault("POST", "/alice/merged/tag/", "drop", hook=lambda: os.killpg(proc.pid, 9)))
    if step == "while committing":  # the Hub kills the bot, then lands the commit it was sending
        hub_server.faults.append(Fault("POST", "/alice/merged/commit/", "lost-reply",
                                       hook=lambda: os.killpg(proc.pid, 9)))  # fmt: skip
    (job,) = running.deliver(payload(sha=seeded)).json()["jobs"]
    if step == "merging":
        running.wait(job["id"], states=("running",), timeout=30)
        os.killpg(proc.pid, signal.SIGKILL)  # the bot and the merge it started
    proc.wait(timeout=180)
    if step == "merging":
        assert "alice/merged" not in hub_server.repos or len(hub_server.commit_list("alice/merged")) <= 2
    else:  # published, not tagged, not reported
        assert len(hub_server.commit_list("alice/merged")) == 2 and hub_server.repos["alice/merged"].tags == {}
        assert "alice/lora" not in hub_server.repos or not _comments(hub_server)
    proc = start(port)
    try:
        done = running.wait(job["id"])
        assert done["state"] in ("succeeded", "skipped"), done["error"]
        assert done["attempts"] >= 2
        (ours, _) = hub_server.commit_list("alice/merged")  # the initial commit and one merge: published once
        assert hub_server.repos["alice/merged"].tags == {"v1.0": ours.oid}
        (comment,) = _comments(hub_server)
        if done["state"] == "skipped":
            assert comment == (
                f"**loraship** published [alice/merged]({hub_server.url}/alice/merged/commit/{ours.oid}), tagged "
                f"`v1.0` from `alice/lora` at `{seeded[:12]}` (tag `v1.0`) into `{done['result']['base']}`: an "
                "earlier attempt published it and was stopped before it could report here."
            )
        else:
            assert comment.startswith(f"**loraship** merged `alice/lora` at `{seeded[:12]}` (tag `v1.0`)")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------- configuration


def test_example_bot_yaml_loads_and_serves_with_only_the_secrets(tmp_path: Path) -> None:
    config = load_bot_config(ROOT / "examples" / "bot.yaml")
    assert [rule.adapter for rule in config.watch] == ["your-org/your-lora"]
    port = _free_port()
    env = {"PATH": os.environ["PATH"], "WEBHOOK_SECRET": SECRET, "HF_TOKEN": "hf_placeholder"}
    proc = subprocess.Popen([sys.executable, "-m", "loraship", "serve", "--config", str(ROOT / "examples" / "bot.yaml"),
                             "--port", str(port)], cwd=tmp_path, env=env, text=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)  # fmt: skip
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/healthz")
                break
            except httpx.TransportError:
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                time.sleep(0.1)
        assert health.json()["status"] == "ok"
        assert (tmp_path / "loraship-bot.db").is_file()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_serve_without_secret(tmp_path: Path) -> None:
    env = {"PATH": os.environ["PATH"], "HF_TOKEN": "hf_placeholder"}
    proc = subprocess.run([sys.executable, "-m", "loraship", "serve", "--config", str(ROOT / "examples" / "bot.yaml")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr == (
        "Error: WEBHOOK_SECRET is not set: the bot does not accept unauthenticated webhook deliveries.\n"
        "Fix: Set WEBHOOK_SECRET to the secret of the webhook in your Hub settings "
        "(https://huggingface.co/settings/webhooks).\n"
    )


def test_serve_with_a_queue_it_cannot_open_says_how_to_fix_it(tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("a file where the queue's folder should be")
    (tmp_path / "bot.yaml").write_text(
        "state: taken/bot.db\nwatch:\n  - adapter: alice/lora\n    job:\n      output: alice/m\n"
    )
    env = {"PATH": os.environ["PATH"], "HF_TOKEN": "hf_placeholder", "WEBHOOK_SECRET": SECRET}
    proc = subprocess.run([sys.executable, "-m", "loraship", "serve", "--config", "bot.yaml"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.splitlines()[-2:] == [
        "Error: Cannot open the bot's job queue `taken/bot.db` (the `state` of bot.yaml): File exists.",
        "Fix: Make its folder writable by the user the bot runs as (uid 1001 in the loraship-bot image: `chown 1001` "
        "the host folder mounted at /data), or set `state` to a file in a writable folder.",
    ]


def test_bot_yaml_errors_name_key_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bot.yaml"
    path.write_text("watch:\n  - adapter: alice/lora\n    tagz: ['v*']\n    job:\n      output: alice/m\n"
                    "      dtype: int4\nexecutor:\n  kind: github\n")  # fmt: skip
    with pytest.raises(ConfigError) as e:
        load_bot_config(path)
    assert e.value.message == (
        f"`{path}` has 2 problem(s):\n"
        "  line 3: unknown key `watch.0.tagz` (known keys: adapter, branches, job, name, tags)\n"
        "  line 7: `executor`: the github executor needs `github: {repository, workflow}` (or `event_type`)"
    )
    path.write_text("watch:\n  - adapter: alice/lora\n    job:\n      output: alice/m\n      dtype: int4\n")
    with pytest.raises(ConfigError) as e:
        load_bot_config(path)
    assert e.value.message == (
        f"`{path}` has 1 problem(s):\n"
        "  line 5: `dtype`: input should be 'keep', 'bfloat16', 'float16' or 'float32' (got 'int4') (in the job of "
        "watch entry 1)"
    )


def test_bot_yaml_refuses_a_watched_repo_id_the_hub_refuses(tmp_path: Path) -> None:
    path = tmp_path / "bot.yaml"
    path.write_text("watch:\n  - adapter: acme/..\n    job:\n      output: alice/m\nexecutor:\n  kind: local\n")
    with pytest.raises(ConfigError) as e:
        load_bot_config(path)
    assert e.value.message == (
        f"`{path}` has 1 problem(s):\n"
        "  line 2: `watch.0.adapter`: 'acme/..' is not a repo id the Hub accepts (huggingface_hub: Repo id must use "
        "alphanumeric chars, '-', '_' or '.'. The name cannot start or end with '-' or '.' and the maximum length is "
        "96: 'acme/..')"
    )


def test_jobs_listing_needs_the_webhook_secret(start_bot_once) -> None:  # type: ignore[no-untyped-def]
    """/jobs names repos (private ones too) and their failures: not for anyone who finds the URL."""
    bot = start_bot_once
    anonymous = httpx.Client(base_url=bot.url, timeout=30)
    response = anonymous.get("/jobs")
    assert response.status_code == 401
    assert response.json()["error"] == "/jobs needs `Authorization: Bearer <the webhook secret>`"
    wrong = anonymous.get("/jobs/x", headers={"Authorization": "Bearer nope"})
    assert (wrong.status_code, wrong.json()["error"]) == (403, "wrong bearer token (use the webhook secret)")
    assert bot.client.get("/jobs").status_code == 200
