"""What GitHub's runner and a bot host rely on in the images: users, entry points, no WORKDIR, a workspace
that cannot shadow the action's code."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from harness import ACTION_IMAGE, BOT_IMAGE, ROOT, docker

import loraship


def config(image: str) -> dict:  # type: ignore[type-arg]
    return json.loads(docker("image", "inspect", image, "--format", "{{json .Config}}").stdout)


def test_the_action_runs_as_root_with_no_workdir_and_a_fixed_entry(images) -> None:
    """GitHub's Docker actions need root (the workspace is the runner's) and set the working directory themselves."""
    cfg = config(ACTION_IMAGE)
    assert cfg.get("User", "") in ("", "root", "0")
    assert cfg.get("WorkingDir", "") == ""
    assert cfg["Entrypoint"] == ["/usr/local/bin/python", "-P", "-m", "entrypoint"]
    assert "PYTHONSAFEPATH=1" in cfg["Env"]
    assert docker("run", "--rm", "--network", "none", "--entrypoint", "id", ACTION_IMAGE, "-u").stdout.strip() == "0"


def test_the_bot_runs_as_uid_1001_and_owns_its_data_folder(images) -> None:
    cfg = config(BOT_IMAGE)
    assert cfg.get("User", "") == "1001" and cfg.get("WorkingDir", "") == ""
    assert cfg["Entrypoint"] == ["/usr/local/bin/loraship"]
    assert cfg["Cmd"] == ["serve", "--config", "/data/bot.yaml", "--host", "0.0.0.0", "--port", "8080"]
    # /data exists and is the bot's, so a named volume mounted there starts writable.
    owner = docker("run", "--rm", "--network", "none", "--entrypoint", "stat", BOT_IMAGE, "-c", "%u", "/data")
    assert owner.stdout.strip() == "1001"


def test_both_images_carry_this_checkouts_loraship(images) -> None:
    for image in (ACTION_IMAGE, BOT_IMAGE):
        version = docker("run", "--rm", "--network", "none", "--entrypoint", "loraship", image, "--version")
        assert version.stdout.split()[:2] == ["loraship", loraship.__version__], image


def test_a_workspace_cannot_shadow_the_action(images, tmp_path: Path) -> None:
    """The runner mounts the workspace and makes it the working directory: files there named like the action's
    modules are never imported (the action still reports the missing input itself)."""
    workspace = tmp_path / "workspace"
    (workspace / "entrypoint").mkdir(parents=True)
    (workspace / "entrypoint" / "__init__.py").write_text("")
    (workspace / "entrypoint" / "__main__.py").write_text("print('SHADOWED'); raise SystemExit(7)\n")
    (workspace / "loraship").mkdir()
    (workspace / "loraship" / "__init__.py").write_text("print('SHADOWED'); raise SystemExit(7)\n")
    (workspace / "yaml.py").write_text("print('SHADOWED'); raise SystemExit(7)\n")
    proc = docker("run", "--rm", "--network", "none", "-v", f"{workspace}:/github/workspace", "-w",
                  "/github/workspace", "-e", "GITHUB_ACTIONS=true", "-e", "GITHUB_WORKSPACE=/github/workspace",
                  ACTION_IMAGE, check=False)  # fmt: skip
    assert "SHADOWED" not in proc.stdout + proc.stderr
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert any(line.startswith("::error") for line in proc.stdout.splitlines()), proc.stdout


def test_the_cuda_variant_install_step_resolves(tmp_path: Path) -> None:
    """The default (CUDA) image is not built here (several GB, no GPU to run it on); its install steps are
    resolved against PyPI instead, as the Dockerfile runs them: the torch layer from the default TORCH_INDEX,
    then the project under constraints/docker.txt. Metadata only (PEP 658): nothing large is downloaded."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    (index,) = re.findall(r"^ARG TORCH_INDEX=(\S+)$", dockerfile, flags=re.M)
    (torch_pin,) = re.findall(r'--index-url "\$\{TORCH_INDEX\}" (torch==\S+)$', dockerfile, flags=re.M)
    report = tmp_path / "report.json"
    # --isolated: this machine's pip configuration (local wheel folders, the CPU torch) must not answer.
    cert = Path("/etc/ssl/certs/ca-certificates.crt")
    command = [sys.executable, "-m", "pip", "install", "--isolated", "--dry-run", "--ignore-installed", "--quiet",
               "--report", str(report), "--index-url", index, "-c", str(ROOT / "constraints" / "docker.txt"),
               torch_pin, str(ROOT)]  # fmt: skip
    if cert.is_file():
        command[4:4] = ["--cert", str(cert)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    installed = {item["metadata"]["name"].lower(): item["metadata"]["version"]
                 for item in json.loads(report.read_text())["install"]}  # fmt: skip
    assert installed["torch"] == torch_pin.split("==")[1]  # PyPI's build, no +cpu: the CUDA one
    assert any(name.startswith("nvidia-") for name in installed), sorted(installed)
    assert installed["loraship"] == loraship.__version__
