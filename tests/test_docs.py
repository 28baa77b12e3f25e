"""The docs: the mkdocs site builds with --strict (a broken link or anchor fails), its reference pages are
generated from the code, and the README's commands and examples are the real ones."""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from loraship.bot.config import load_bot_config
from loraship.cli import build_parser
from loraship.run.job import MergeJob, load_jobs

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def mkdocs_build(cwd: Path, site: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)], cwd=cwd,
                          capture_output=True, text=True, check=False,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})  # fmt: skip


def load_hooks():
    spec = importlib.util.spec_from_file_location("loraship_docs_hooks", ROOT / "docs" / "hooks.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_docs_build_strict_with_generated_reference_pages(tmp_path: Path) -> None:
    proc = mkdocs_build(ROOT, tmp_path / "site")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    cli = (tmp_path / "site" / "reference" / "cli" / "index.html").read_text()
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert set(commands) >= {"plan", "merge", "verify", "run", "serve", "demo"}
    for name, sub in commands.items():
        assert f"loraship {name}" in cli
        for action in sub._actions:
            for flag in action.option_strings:
                assert flag in cli, f"loraship {name} {flag} is missing from the CLI reference"
    config = (tmp_path / "site" / "reference" / "configuration" / "index.html").read_text()
    for key in job_keys(MergeJob):
        assert f"<code>{key}</code>" in config, f"{key} is missing from the configuration reference"
    action = yaml.safe_load((ROOT / "action.yml").read_text())
    action_page = (tmp_path / "site" / "action" / "index.html").read_text()
    for name in [*action["inputs"], *action["outputs"]]:
        assert f"<code>{name}</code>" in action_page, f"the action's {name} is missing from its page"
    errors = (tmp_path / "site" / "troubleshooting" / "index.html").read_text()
    assert "<code>VerificationFailed</code>" in errors and "loraship:errors" not in errors


def test_a_broken_link_fails_the_build(tmp_path: Path) -> None:
    for name in ("docs", "examples"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("mkdocs.yml", "action.yml"):
        shutil.copy(ROOT / name, tmp_path / name)
    page = tmp_path / "docs" / "security.md"
    page.write_text(page.read_text() + "\nSee [the missing page](no-such-page.md) and [an anchor](merging.md#nope).\n")
    proc = mkdocs_build(tmp_path, tmp_path / "site")
    assert proc.returncode != 0
    assert "no-such-page.md" in proc.stderr and "#nope" in proc.stderr


def test_cli_reference_takes_any_kind_of_flag(monkeypatch) -> None:
    """Another command or flag, of any argparse kind, appears in the reference without touching the hook."""
    hooks = load_hooks()

    def parser_with_more() -> argparse.ArgumentParser:
        parser = build_parser()
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        extra = sub.add_parser("frobnicate", aliases=["frob"], help="a command added later")
        extra.add_argument("paths", nargs="+", type=Path, help="folders | files")
        extra.add_argument("--label", action="append", help="repeat it")
        extra.add_argument("-v", "--verbose", action="count", default=0, help="more output")
        group = extra.add_mutually_exclusive_group()
        group.add_argument("--fast", action="store_true", help="quick")
        group.add_argument("--level", type=int, choices=range(3), default=1, help="how hard")
        extra.add_argument("--pair", nargs=2, metavar=("A", "B"), help="two values")
        extra.add_argument("--hidden", help=argparse.SUPPRESS)
        return parser

    monkeypatch.setattr("loraship.cli.build_parser", parser_with_more)
    text = hooks.cli_reference()
    assert text.count("## `loraship frobnicate`") == 1 and "## `loraship frob`" not in text
    expected = [
        "A command added later.",
        "`paths` (required) (repeatable)",
        "folders \\| files",
        "`--fast`",
        "`--label` `LABEL` (repeatable)",
        "`-v, --verbose`",
        "`--level` `{0,1,2}`",
        "`--pair` `A B`",
        "`1`",
    ]
    for item in expected:
        assert item in text, item
    assert "--hidden" not in text


def test_every_job_key_is_documented_and_only_those(tmp_path: Path, caplog) -> None:
    hooks = load_hooks()
    meanings = hooks.documented_keys((ROOT / "docs" / "configuration.md").read_text())
    assert set(meanings) == set(job_keys(MergeJob))
    with caplog.at_level("WARNING"):
        hooks.config_reference({k: v for k, v in meanings.items() if k != "verify.max_memory"} | {"verify.old": "x"})
    assert [r.getMessage().split(":")[1].strip() for r in caplog.records] == [
        "the job key `verify.max_memory` (loraship.run.job) has no row in its key table",
        "its key table has `verify.old`, which no job takes (loraship.run.job)",
    ]


def job_keys(model: type, prefix: str = "") -> list[str]:
    """Every key of a job, nested ones as `verify.max_memory` (a job's `name` is its key under `jobs:`)."""
    hooks = load_hooks()
    keys = []
    for name, field in model.model_fields.items():
        if model is MergeJob and name == "name":
            continue
        key = f"{prefix}{name}"
        keys.append(key)
        nested = hooks.nested_model(field.annotation)
        if nested is not None:
            keys += job_keys(nested, f"{key}.")
    return keys


# --------------------------------------------------------------------------- the README


def readme_blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README.read_text(), re.M | re.S)


def test_readme_is_short_and_its_set_up_commands_are_ci_s() -> None:
    assert len(README.read_text().splitlines()) <= 300
    install, test = readme_blocks("bash")[0].strip().splitlines()
    ci = (ROOT / ".ci" / "run").read_text()
    ci_install = next(line for line in ci.splitlines() if " -m pip install " in line)
    # The README adds PyTorch's CPU index (an ordinary machine finds torch's CPU build there); CI gets it from
    # PIP_EXTRA_INDEX_URL (.github/workflows/ci.yml) or finds the wheel locally, and installs quietly.
    assert install == "python3 -m venv .venv && " + ci_install.replace(" --quiet", "").replace(
        " -m pip install ", " -m pip install --extra-index-url https://download.pytorch.org/whl/cpu "
    )
    assert "python3 -m venv .venv" in ci
    assert test in ci.splitlines()
    workflow = (ROOT / ".github" / "workflows" / "ci.yml").read_text()
    assert "PIP_EXTRA_INDEX_URL: https://download.pytorch.org/whl/cpu" in workflow


def test_readme_examples_are_valid(tmp_path: Path) -> None:
    blocks = readme_blocks("yaml")
    job_file = tmp_path / "loraship.yaml"
    job_file.write_text(next(b for b in blocks if b.startswith("jobs:")))
    assert list(load_jobs(job_file)) == ["chat"]
    bot_file = tmp_path / "bot.yaml"
    bot_file.write_text(next(b for b in blocks if b.startswith("state:")))
    assert load_bot_config(bot_file).watch[0].adapter == "your-org/your-lora"
    workflow = yaml.safe_load(next(b for b in blocks if b.startswith("on:")))
    action = yaml.safe_load((ROOT / "action.yml").read_text())
    step = next(s for s in workflow["jobs"]["merge"]["steps"] if "your-org/loraship@" in s.get("uses", ""))
    assert set(step["with"]) <= set(action["inputs"])
    text = next(b for b in blocks if b.startswith("on:"))
    assert set(re.findall(r"steps\.loraship\.outputs\.([\w-]+)", text)) <= set(action["outputs"])
    for command in re.findall(r"^loraship (.+)$", readme_blocks("bash")[2] + readme_blocks("bash")[3], re.M):
        argv = re.sub(r"\[(.*?)\]", r"\1", command.split("#")[0]).split()
        build_parser().parse_args(argv)  # exits 2 on an unknown flag


def test_readme_links_lead_somewhere() -> None:
    text = README.read_text()
    headings = {slug(h) for h in re.findall(r"^#+ (.+)$", text, re.M)}
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, fragment = target.partition("#")
        if not path:
            assert fragment in headings, target
            continue
        assert (ROOT / path).exists(), target
        if fragment:
            page = (ROOT / path).read_text()
            assert fragment in {slug(h) for h in re.findall(r"^#+ (.+)$", page, re.M)}, target


def slug(heading: str) -> str:
    """The anchor GitHub and mkdocs give a heading (lowercase, punctuation dropped, spaces as hyphens)."""
    text = re.sub(r"[^\w\- ]", "", heading.replace("`", "")).strip().lower()
    return re.sub(r"[ ]", "-", text)


@pytest.mark.parametrize("page", sorted(p.name for p in (ROOT / "docs").glob("*.md")))
def test_documented_image_tags_are_the_released_ones(page: str) -> None:
    version = re.search(r'^version = "(.+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    assert version is not None
    tags = set(re.findall(r"ghcr\.io/your-org/loraship(?:-bot)?:([\w.-]+)", (ROOT / "docs" / page).read_text()))
    assert tags <= {f"v{version[1]}", f"v{version[1]}-cpu"}, tags


def test_exit_codes_are_the_cli_s() -> None:
    """The README's and docs/exit-codes.md's tables list the codes loraship.cli's docstring names."""
    import loraship.cli

    codes = set(re.findall(r"^- \*\*(\d+)\*\*", loraship.cli.__doc__ or "", re.M))
    assert {"0", "1", "2", "70"} <= codes
    for path in (README, ROOT / "docs" / "exit-codes.md"):
        assert set(re.findall(r"^\| \*\*(\d+)\*\* \|", path.read_text(), re.M)) == codes, path.name


def test_every_method_loraship_merges_has_a_row_in_merging_md() -> None:
    """docs/merging.md's method table names each registered method, and no method that is not merged."""
    from loraship.methods.base import registry

    page = (ROOT / "docs" / "merging.md").read_text()
    rows = set(re.findall(r"^\| [^|]+ \(`([A-Z_0-9]+)`\) \|", page, flags=re.M))
    assert rows == set(registry()) | {"LN_TUNING", "TRAINABLE_TOKENS"}
