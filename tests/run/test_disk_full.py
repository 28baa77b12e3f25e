"""``loraship run`` on a disk that fills up after the preflight passed (a small tmpfs the test mounts, and
``ulimit -f``, which needs no root), and a run the preflight refuses: a known failure naming the folder,
its free space and the setting that moves it, nothing published, and nothing of the run left in its folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import LLAMA, TOKENS
from huggingface_hub import constants

from loraship.cli import main
from loraship.run.streaming import BaseFeed
from loraship.text import human_bytes
from loraship.tiny import build_adapter

WEIGHTS_ONLY = "adapter: alice/lora\nverify:\n  outputs: false\n"
FIX = "Fix: Free space there (or raise the quota or the file size limit, `ulimit -f`), or {setting}, then run again.\n"
CACHE = "move the Hugging Face cache to a disk with more room (HF_HOME, or HF_HUB_CACHE)"
WORKDIR = "put the run's folder on a disk with more room (--workdir)"


@pytest.fixture
def seeded(hub_server, model_cache, tmp_path: Path, monkeypatch) -> Path:
    """meta/base and alice/lora on the local Hub, and alice/existing (one commit); returns the job file."""
    base = model_cache(LLAMA, tokenizer=True)
    adapter = build_adapter(base, tmp_path / "adapter", target_modules=["q_proj", "v_proj"])
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "meta/base"}))
    hub_server.seed("meta/base", base)
    hub_server.seed("alice/lora", adapter)
    hub_server.seed("alice/existing", adapter)
    monkeypatch.setenv("HF_ENDPOINT", hub_server.url)
    monkeypatch.setenv("HF_TOKEN", TOKENS["alice"])
    job = tmp_path / "job.yaml"
    job.write_text(WEIGHTS_ONLY)
    return job


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 96 MB tmpfs mounted for the test (root only; the preflight keeps 64 MB free beyond its estimate),
    unmounted whatever happens."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root and mount(8)")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96m", "tmpfs", str(mount)], capture_output=True,
                          text=True, check=False)  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path) -> str:
    """Fill ``disk`` to the last byte (outside the run's folders); returns its free space, as the message says it."""
    with (disk / "filler").open("wb", buffering=0) as f:
        for chunk in (1 << 20, 1 << 12, 1):
            try:
                while True:
                    f.write(b"\0" * chunk)
            except OSError:
                pass
    return human_bytes(shutil.disk_usage(disk).free)


def run_cli(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str]:
    code = main(["run", *map(str, args), "--quiet"])
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("where", "args", "output"),
    [
        ("downloads", [], "alice/merged"),  # streamed to a new repo: created empty for the upload, then deleted
        ("downloads", [], "dir"),  # streamed to a folder
        ("headers", [], "alice/existing"),  # the config and the weights' headers copied into the run's folder
        ("cache", ["--no-stream"], "alice/existing"),  # the sequential path's download into HF_HOME
        ("cache", ["--no-stream"], "dir"),
    ],
    ids=["streamed-new-repo", "streamed-dir", "streamed-headers", "sequential-repo", "sequential-dir"],
)
def test_a_disk_that_fills_up_during_the_run_is_a_known_failure_and_leaves_nothing(
    seeded, hub_server, small_disk: Path, tmp_path: Path, capsys, monkeypatch, where: str, args: list[str], output: str
) -> None:
    from loraship.run import fetch

    work = small_disk / "work"
    work.mkdir()
    (work / "kept.txt").write_text("here before the run\n")
    if where == "cache":  # HF_HOME on the small disk
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(small_disk / "hf" / "hub"))
    free: list[str] = []
    if where == "headers":
        real_remote_base = fetch.remote_base

        def filling_remote_base(*a: Any, **k: Any) -> Any:
            free.append(fill(small_disk))
            return real_remote_base(*a, **k)

        monkeypatch.setattr(fetch, "remote_base", filling_remote_base)
    elif where == "downloads":  # the merge has started: its base's weights download now
        real_download = BaseFeed._download

        def filling_download(self: BaseFeed, name: str) -> None:
            with self._cond:  # once the merge waits for this file, so past its own free-space check
                assert self._cond.wait_for(lambda: name in self._wanted, timeout=60)
            free.append(fill(small_disk))
            real_download(self, name)

        monkeypatch.setattr(BaseFeed, "_download", filling_download)
    else:
        real_check = fetch.check_machine

        def filling_check(*a: Any, **k: Any) -> None:  # the preflight passes, then the disk fills up
            real_check(*a, **k)
            free.append(fill(small_disk))

        monkeypatch.setattr(fetch, "check_machine", filling_check)
    commits = hub_server.commit_list("alice/existing")
    target = f"dir:{tmp_path / 'out'}" if output == "dir" else output
    code, err = run_cli(capsys, "--config", seeded, "--output", target, "--workdir", work, *args)
    assert code == 1, err
    assert len(free) == 1
    what, folder, setting = {
        "downloads": ("the base's `model.safetensors`", work / "default" / "base-downloads", WORKDIR),
        "headers": ("the base's small files and weight headers", work / "default" / "base", WORKDIR),
        "cache": ("the base's files", small_disk / "hf" / "hub", CACHE),
    }[where]
    assert err == (
        f"Error: Writing {what} into `{folder}` failed: No space left on device; its disk has {free[0]} free. "
        "Nothing was published.\n" + FIX.format(setting=setting)
    )
    assert hub_server.commit_list("alice/existing") == commits  # nothing published
    assert "alice/merged" not in hub_server.repos  # the repo made empty for the streamed upload is gone
    assert sorted(p.name for p in work.iterdir()) == ["kept.txt"]  # nothing of the run left in its folder
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith((".out", "out"))) == []


def test_a_run_the_preflight_refuses_leaves_nothing_in_its_workdir(seeded, hub_server, tmp_path: Path, capsys,
                                                                   monkeypatch) -> None:  # fmt: skip
    import shutil as real_shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(real_shutil, "disk_usage", lambda path: usage(10**12, 10**12 - 10**6, 10**6))
    work = tmp_path / "work"
    (work / "default").mkdir(parents=True)  # the job's folder in it, from an earlier run
    (work / "default" / "kept.txt").write_text("here before the run\n")
    for args in ([], ["--no-stream"]):
        code, err = run_cli(capsys, "--config", seeded, "--output", "alice/merged", "--workdir", work, *args)
        assert code == 1
        assert "Nothing was downloaded." in err, err
        assert sorted(p.name for p in (work / "default").iterdir()) == ["kept.txt"]  # no configs, no sparse weights
    fresh = tmp_path / "fresh" / "work"  # a --workdir the run made is removed again
    code, err = run_cli(capsys, "--config", seeded, "--output", "alice/merged", "--workdir", fresh)
    assert code == 1 and "Nothing was downloaded." in err, err
    assert not fresh.exists()
    assert "alice/merged" not in hub_server.repos


@pytest.mark.parametrize("args", [[], ["--no-stream"]], ids=["streamed", "sequential"])
def test_the_file_size_limit_during_the_run_is_a_known_failure_and_leaves_nothing(
    seeded, hub_server, model_cache, tmp_path: Path, args: list[str]
) -> None:
    """``ulimit -f`` below the base's weights file (where no small disk can be mounted, a full disk as the run
    sees it: EFBIG): the same known failure, nothing published, nothing of the run left behind."""
    import re
    import sys

    base = model_cache(LLAMA, tokenizer=True)
    weights = (base / "model.safetensors").stat().st_size
    limit = weights // 2  # bytes; every other file of the base, the adapter and the job is smaller than that
    assert all(p.stat().st_size < limit for p in base.iterdir() if p.name != "model.safetensors")
    work = tmp_path / "work"
    work.mkdir()
    (work / "kept.txt").write_text("here before the run\n")
    hf_home = tmp_path / "hf"
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_DISABLE_XET": "1"}
    env.pop("HF_HUB_CACHE", None)

    commits = hub_server.commit_list("alice/existing")
    command = [sys.executable, "-m", "loraship", "run", "--config", str(seeded), "--output", "alice/existing",
               "--workdir", str(work), "--quiet", *args]  # fmt: skip
    # bash's ulimit -f counts 1024-byte blocks; Python ignores SIGXFSZ, so a write past it fails with EFBIG
    done = subprocess.run(["bash", "-c", f'ulimit -f {limit // 1024} && exec "$@"', "bash", *command], env=env,
                          capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert done.returncode == 1, done.stderr
    what, folder, setting = (
        ("the base's files", hf_home / "hub", CACHE) if args else
        ("the base's small files and weight headers", work / "default" / "base", WORKDIR)  # its sized placeholder
    )  # fmt: skip
    pattern = (
        re.escape(f"Error: Writing {what} into `{folder}` failed: File too large; its disk has ")
        + r"[0-9.]+ [KMGT]?i?B free\. Nothing was published\.\n"
        + re.escape(FIX.format(setting=setting))
    )
    assert re.fullmatch(pattern, done.stderr), done.stderr
    assert hub_server.commit_list("alice/existing") == commits  # nothing published
    assert sorted(p.name for p in work.iterdir()) == ["kept.txt"]  # nothing of the run left in its folder
