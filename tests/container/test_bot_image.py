"""The bot's image as docs/bot.md deploys it: ``docker run`` with a bot.yaml and the queue on a data volume,
the Hub's signed webhook delivered to it, a ``docker kill`` and a second container on the same volume."""

from __future__ import annotations

import json
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import LLAMA, TOKENS
from harness import TAGS, chown, docker
from test_webhook import SECRET, Running, payload

from loraship.tiny import build_adapter

BOT_YAML = """\
state: /data/loraship-bot.db
retry:
  attempts: 3
  backoff_seconds: 0.5
watch:
  - adapter: alice/lora
    tags: ["v*"]
    job:
      output: alice/merged
      verify:
        generation_tokens: 4
"""


@pytest.fixture
def seeded(hub_server, model_cache, tmp_path: Path) -> str:  # type: ignore[no-untyped-def]
    """meta/base and alice/lora (tag v1.0) on the local Hub; returns the tag's SHA."""
    base = tmp_path / "base"
    shutil.copytree(model_cache(LLAMA, tokenizer=True), base)
    hub_server.seed("meta/base", base)
    adapter = build_adapter(base, tmp_path / "adapter", target_modules=["q_proj"])
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": "meta/base"}))
    return hub_server.seed("alice/lora", adapter, tags=("v1.0",))


@pytest.fixture
def data(images, tmp_path: Path) -> Path:
    """The host folder mounted at /data: bot.yaml, and the queue the bot (uid 1001) writes."""
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "bot.yaml").write_text(BOT_YAML)
    chown(folder, 1001)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_bot(name: str, data: Path, hub_url: str, port: int, env_file: Path) -> Running:
    """docs/bot.md's `docker run`, on the host's network (the local Hub is on its 127.0.0.1)."""
    (image,) = TAGS["loraship:bot-cpu"]
    docker("run", "-d", "--name", name, "--network", "host", "-v", f"{data}:/data", "--env-file", str(env_file),
           image, "serve", "--config", "/data/bot.yaml", "--host", "127.0.0.1", "--port", str(port))  # fmt: skip
    running = Running(None, f"http://127.0.0.1:{port}")  # type: ignore[arg-type]
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            health = running.client.get("/healthz")
            if health.status_code == 200:
                assert health.json()["status"] == "ok"
                return running
        except httpx.TransportError:
            pass
        if docker("inspect", name, "--format", "{{.State.Running}}").stdout.strip() != "true":
            break
        time.sleep(0.5)
    raise AssertionError(f"the bot container did not answer /healthz:\n{docker('logs', name, check=False).stderr}")


def env_file(tmp_path: Path, hub_url: str) -> Path:
    """The bot's secrets and endpoint, as `docker run --env-file` takes them (not on the command line)."""
    path = tmp_path / "bot.env"
    path.write_text(f"WEBHOOK_SECRET={SECRET}\nHF_TOKEN={TOKENS['alice']}\nHF_ENDPOINT={hub_url}\n"
                    "HF_HUB_DISABLE_XET=1\n")  # fmt: skip
    return path


def comments(hub_server: Any) -> list[str]:
    return [e["data"]["latest"]["raw"] for d in hub_server.repos["alice/lora"].discussions for e in d.events]


def test_the_bot_container_merges_publishes_and_comments(images, seeded, hub_server, data, containers,
                                                         tmp_path: Path) -> None:  # fmt: skip
    containers.append("loraship-bot-test-1")
    bot = start_bot(containers[0], data, hub_server.url, free_port(), env_file(tmp_path, hub_server.url))
    assert bot.deliver(payload(sha=seeded), secret="wrong").status_code == 403
    (job,) = bot.deliver(payload(sha=seeded)).json()["jobs"]
    done = bot.wait(job["id"], timeout=300)
    assert done["state"] == "succeeded", done["error"]
    (commit, _) = hub_server.commit_list("alice/merged")
    assert hub_server.repos["alice/merged"].tags == {"v1.0": commit.oid}
    assert done["result"]["commit_sha"] == commit.oid and done["result"]["verified"] is True
    (comment,) = comments(hub_server)
    assert comment.startswith(f"**loraship** merged `alice/lora` at `{seeded[:12]}` (tag `v1.0`) into `meta/base@")
    health = bot.client.get("/healthz").json()
    assert health["status"] == "ok" and health["jobs"].get("succeeded") == 1
    # The queue is on the volume, written by the image's user (uid 1001), not root.
    assert (data / "loraship-bot.db").stat().st_uid == 1001
    logs = docker("logs", containers[0])
    assert TOKENS["alice"] not in logs.stdout + logs.stderr and SECRET not in logs.stdout + logs.stderr


def test_a_killed_bot_container_is_resumed_by_the_next_one(images, seeded, hub_server, data, containers,
                                                           tmp_path: Path) -> None:  # fmt: skip
    """docker kill mid-merge; a second container on the same volume resumes the queue: published once."""
    secrets = env_file(tmp_path, hub_server.url)
    containers += ["loraship-bot-test-killed", "loraship-bot-test-next"]
    port = free_port()
    first = start_bot(containers[0], data, hub_server.url, port, secrets)
    (job,) = first.deliver(payload(sha=seeded)).json()["jobs"]
    first.wait(job["id"], states=("running",), timeout=60)
    docker("kill", containers[0])  # SIGKILL: the bot and the merge it started, mid-job
    assert "alice/merged" not in hub_server.repos or len(hub_server.commit_list("alice/merged")) <= 2
    docker("rm", containers[0])
    second = start_bot(containers[1], data, hub_server.url, port, secrets)
    done = second.wait(job["id"], timeout=300)
    assert done["state"] in ("succeeded", "skipped"), done["error"]
    assert done["attempts"] >= 2
    (ours, _) = hub_server.commit_list("alice/merged")  # the initial commit and one merge: published once
    assert hub_server.repos["alice/merged"].tags == {"v1.0": ours.oid}
    (comment,) = comments(hub_server)
    assert f"`alice/lora` at `{seeded[:12]}` (tag `v1.0`)" in comment
    # Delivered again to the new container: the same job, nothing new.
    assert second.deliver(payload(sha=seeded)).json()["jobs"][0] == {"id": job["id"], "duplicate": True}


def test_a_volume_the_bot_cannot_write_is_refused_with_the_fix(images, tmp_path: Path) -> None:
    """A host folder left owned by root (the usual first try): a clear refusal, not a traceback."""
    folder = tmp_path / "root-owned"
    folder.mkdir()
    (folder / "bot.yaml").write_text(BOT_YAML)
    chown(folder, 0)
    (image,) = TAGS["loraship:bot-cpu"]
    proc = docker("run", "--rm", "--network", "none", "-v", f"{folder}:/data", "-e", f"WEBHOOK_SECRET={SECRET}",
                  "-e", "HF_TOKEN=hf_placeholder", image, check=False)  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.splitlines()[-2:] == [
        "Error: Cannot open the bot's job queue `/data/loraship-bot.db` (the `state` of bot.yaml): unable to open "
        "database file.",
        "Fix: Make its folder writable by the user the bot runs as (uid 1001 in the loraship-bot image: `chown 1001` "
        "the host folder mounted at /data), or set `state` to a file in a writable folder.",
    ]
    assert not (folder / "loraship-bot.db").exists()
