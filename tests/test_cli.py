"""The README's commands: the demo runs offline and passes; --version answers; command-line mistakes are
usage errors (exit 2) with a fix that matches them."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import LLAMA

from loraship import __version__
from loraship.cli import build_parser, main, run_overrides
from loraship.tiny import build_adapter


def test_demo_runs_offline_and_passes(tmp_path: Path, capsys) -> None:
    assert main(["demo", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "Verification passed." in out
    assert "4. The usual way (PEFT merge_and_unload + save_pretrained): 21 of 21 tensors bit-identical." in out
    assert "Demo passed: the merged model is PEFT's merge, verified.\n" in out
    assert out.rstrip().endswith(
        f"Kept in {tmp_path}: base/, adapter/ and merged/ (try `loraship plan --base {tmp_path / 'base'} "
        f"--adapter {tmp_path / 'adapter'}`)."
    )
    assert (tmp_path / "merged" / "model.safetensors").is_file()


def test_demo_without_workdir_says_its_files_are_gone(capsys) -> None:
    assert main(["demo"]) == 0
    last = capsys.readouterr().out.rstrip().splitlines()[-1]
    assert last.startswith("The files were in a temporary folder (")
    assert last.endswith("), now deleted: pass --workdir DIR to keep them.")
    assert not Path(last.split("(", 1)[1].split(")", 1)[0]).exists()


def test_version(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out == f"loraship {__version__}\n"


# --------------------------------------------------------------------------- a newcomer's first hour
# Command-line mistakes are usage errors: exit 2, a message naming the flag and a fix that matches it,
# before any work (the paths below need not exist: nothing is read).


def fails(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    assert captured.out == ""
    return code, captured.err


VERIFY = ("verify", "--base", "b", "--adapter", "a", "--merged", "m")


@pytest.mark.parametrize(
    ("args", "error", "fix"),
    [
        ((*VERIFY, "--min-top1", "5"), "--min-top1 '5' is not a fraction from 0 to 1.",
         "Give --min-top1 a fraction from 0 to 1, e.g. --min-top1 0.95."),
        ((*VERIFY, "--generation-tokens", "-1"),
         "--generation-tokens '-1' is not a whole number >= 0 (0 skips the generation check).",
         "Give --generation-tokens a whole number >= 0 (0 skips the generation check), e.g. --generation-tokens 32."),
        ((*VERIFY, "--weight-atol", "-1"), "--weight-atol '-1' is not a number >= 0.",
         "Give --weight-atol a number >= 0, e.g. --weight-atol 1e-6."),
        ((*VERIFY, "--weight-atol", "nan"), "--weight-atol 'nan' is not a number >= 0.",
         "Give --weight-atol a number >= 0, e.g. --weight-atol 1e-6."),
        ((*VERIFY, "--max-error-ratio", "-0.1"), "--max-error-ratio '-0.1' is not a number >= 0.",
         "Give --max-error-ratio a number >= 0, e.g. --max-error-ratio 0.05."),
        ((*VERIFY, "--max-memory", "lots"), "--max-memory 'lots' is not a size.",
         "Use a number with a unit, e.g. 5GB or 500MB."),
        (("run", "--adapter", "org/a", "--output", "org/m", "--max-memory", "lots"),
         "--max-memory 'lots' is not a size.", "Use a number with a unit, e.g. 5GB or 500MB."),
        (("run", "--adapter", "org/a", "--output", "org/m", "--max-shard-size", "1XB"),
         "--max-shard-size '1XB' is not a size.", "Use a number with a unit, e.g. 5GB or 500MB."),
        (("serve", "--config", "bot.yaml", "--port", "70000"), "--port '70000' is not a port number from 0 to 65535.",
         "Give --port a port number from 0 to 65535, e.g. --port 8080."),
        (("plan", "--base", "b", "--adapter", "a", "--dtype", "int8"),
         "--dtype 'int8' is not one of: keep, bfloat16, float16, float32.",
         "Pass --dtype one of: keep, bfloat16, float16, float32."),
    ],
)  # fmt: skip
def test_values_out_of_range_name_their_flag(capsys, args: tuple[str, ...], error: str, fix: str) -> None:
    assert fails(capsys, *args) == (2, f"Error: {error}\nFix: {fix}\n")


def test_each_usage_error_has_its_own_fix(capsys) -> None:
    assert fails(capsys, "run", "--adapter", "org/a") == (2, (
        "Error: `loraship run` needs --output (or a --config file).\n"
        "Fix: Add --output org/name (a Hub repo) or --output dir:PATH (a local folder); or pass --config "
        "loraship.yaml.\n"
    ))  # fmt: skip
    assert fails(capsys, "run", "--dry-run") == (2, (
        "Error: `loraship run` needs --adapter and --output (or a --config file).\n"
        "Fix: Add --adapter org/name (a Hub repo, optionally @revision) or --adapter ./folder; and --output org/name "
        "(a Hub repo) or --output dir:PATH (a local folder); or pass --config loraship.yaml.\n"
    ))  # fmt: skip
    assert fails(capsys, "run", "--adapter", "org/a", "--output", "org/m", "--job", "chat") == (2, (
        "Error: --job names a job of a --config file, and no --config is given.\n"
        "Fix: Add --config loraship.yaml (the file whose `jobs:` hold that name), or drop --job.\n"
    ))  # fmt: skip
    assert fails(capsys, "run", "--adapter", "not a repo", "--output", "org/m") == (2, (
        "Error: --adapter: 'not a repo' is neither a Hub repo id (`org/name`, optionally `@revision`) nor an existing "
        "local folder (write local folders as ./path or /path).\n"
        "Fix: Pass --adapter org/name (a Hub repo, optionally @revision) or a local folder as ./path.\n"
    ))  # fmt: skip
    assert fails(capsys, "run", "--adapter", "org/a", "--output", "nope") == (2, (
        "Error: --output: 'nope' is neither a Hub repo id (`org/name`) nor `dir:PATH`.\n"
        "Fix: Pass --output org/name (a Hub repo) or --output dir:PATH (a local folder).\n"
    ))  # fmt: skip
    assert fails(capsys, "merge", "--base", "b", "--adapter", "a") == (
        2, "Error: `loraship merge` needs --output.\nFix: Give --output; see `loraship merge --help`.\n"
    )  # fmt: skip
    assert fails(capsys, "merge", "--base", "b", "--adapter", "a", "--output") == (
        2, "Error: --output needs a value.\nFix: Put the value right after --output; see `loraship merge --help`.\n"
    )  # fmt: skip
    assert fails(capsys, "run", "--adapter", "org/a", "--output", "org/m", "--verify", "full", "--no-verify") == (
        2, "Error: --no-verify and --verify contradict each other.\n"
        "Fix: Give either --no-verify or --verify, not both.\n"
    )  # fmt: skip
    assert fails(capsys, "merge", "--base", "b", "--adapter", "a", "--output", "o", "--quiet", "--progress") == (
        2, "Error: --progress and --quiet contradict each other.\nFix: Give either --progress or --quiet, not both.\n"
    )  # fmt: skip
    assert fails(capsys, "plan", "--base", "b", "--adapter", "a", "extra") == (2, (
        "Error: Unexpected argument(s): extra.\n"
        "Fix: Remove them, or add the flag whose value they are; see `loraship COMMAND --help`.\n"
    ))  # fmt: skip
    assert fails(capsys) == (2, (
        "Error: `loraship` needs a command.\n"
        "Fix: Run `loraship COMMAND ...`, COMMAND one of: plan, merge, verify, run, serve, demo.\n"
    ))  # fmt: skip


def test_a_misspelled_flag_or_command_is_named_with_the_closest(capsys) -> None:
    # --adpater leaves --adapter missing: the misspelling is what gets named, not the missing flag
    assert fails(capsys, "merge", "--adpater", "a", "--base", "b", "--output", "o") == (2, (
        "Error: `loraship merge` has no flag --adpater.\n"
        "Fix: Did you mean --adapter? See `loraship merge --help` for its flags.\n"
    ))  # fmt: skip
    assert fails(capsys, "run", "--adapter=org/a", "--output", "org/m", "--dry-rum") == (2, (
        "Error: `loraship run` has no flag --dry-rum.\nFix: Did you mean --dry-run? See `loraship run --help` for its "
        "flags.\n"
    ))  # fmt: skip
    assert fails(capsys, "plan", "--base", "b", "--adapter", "a", "--zzz") == (
        2, "Error: `loraship plan` has no flag --zzz.\nFix: See `loraship plan --help` for its flags.\n"
    )  # fmt: skip
    assert fails(capsys, "mrege") == (2, (
        "Error: `loraship` has no command `mrege`.\n"
        "Fix: Did you mean merge? The commands are: plan, merge, verify, run, serve, demo.\n"
    ))  # fmt: skip
    assert fails(capsys, "--verison") == (
        2, "Error: `loraship` has no flag --verison.\n"
        "Fix: Did you mean --version? See `loraship --help` for its flags.\n"
    )  # fmt: skip
    # values that look like flags are left to their flag: a negative number is a value
    assert fails(capsys, *VERIFY, "--weight-atol", "-1e-3")[1].startswith("Error: --weight-atol '-1e-3' is not a")


def test_output_paths_are_checked_when_the_arguments_are_parsed(tmp_path: Path, capsys) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert fails(capsys, "run", "--config", "local.yaml", "--result", afile / "r.json") == (2, (
        f"Error: --result `{afile / 'r.json'}`: `{afile}` is a file, not a folder.\n"
        "Fix: Pass --result a file path, e.g. --result result.json (missing folders are created).\n"
    ))  # fmt: skip
    assert fails(capsys, "run", "--config", "local.yaml", "--result", tmp_path) == (
        2, f"Error: --result `{tmp_path}` is a folder.\nFix: Pass --result a file path, e.g. --result result.json.\n"
    )  # fmt: skip
    assert fails(capsys, *VERIFY, "--report", afile / "sub" / "r.json") == (2, (
        f"Error: --report `{afile / 'sub' / 'r.json'}`: `{afile}` is a file, not a folder.\n"
        "Fix: Pass --report a file path, e.g. --report report.json (missing folders are created).\n"
    ))  # fmt: skip
    assert fails(capsys, *VERIFY, "--markdown", tmp_path) == (
        2, f"Error: --markdown `{tmp_path}` is a folder.\n"
        "Fix: Pass --markdown a file path, e.g. --markdown report.md.\n"
    )  # fmt: skip
    assert fails(capsys, "demo", "--workdir", afile) == (2, (
        f"Error: --workdir `{afile}` is a file, not a folder.\n"
        "Fix: Pass --workdir a folder (it is created if missing), or leave --workdir out to use a temporary folder.\n"
    ))  # fmt: skip
    assert fails(capsys, "run", "--adapter", "org/a", "--output", "org/m", "--workdir", afile)[0] == 2


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write any folder")
def test_an_unwritable_result_folder_is_refused(tmp_path: Path, capsys) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        assert fails(capsys, "run", "--config", "local.yaml", "--result", locked / "r.json") == (2, (
            f"Error: --result `{locked / 'r.json'}`: the folder `{locked}` is not writable.\n"
            "Fix: Pass --result a file path, e.g. --result result.json in a folder you can write to.\n"
        ))  # fmt: skip
    finally:
        locked.chmod(0o700)


@pytest.fixture
def tiny(model_cache, tmp_path: Path) -> tuple[Path, Path]:
    base = model_cache(LLAMA)
    return base, build_adapter(base, tmp_path / "adapter", target_modules=["q_proj", "v_proj"])


def test_missing_report_folders_are_created(tiny, tmp_path: Path, capsys) -> None:
    base, adapter = tiny
    merged = tmp_path / "merged"
    assert main(["merge", "--base", str(base), "--adapter", str(adapter), "--output", str(merged), "--quiet"]) == 0
    report, markdown = tmp_path / "new" / "r.json", tmp_path / "new" / "deeper" / "r.md"
    args = ["verify", "--base", base, "--adapter", adapter, "--merged", merged, "--weights-only"]
    assert main([*map(str, args), "--report", str(report), "--markdown", str(markdown), "--quiet"]) == 0
    assert capsys.readouterr().out.endswith("Verification passed.\n")
    assert json.loads(report.read_text())["passed"] is True
    assert markdown.read_text().startswith("### loraship verification: passed")


def test_run_verify_modes_and_result_folder(tiny, tmp_path: Path, capsys) -> None:
    base, adapter = tiny
    result = tmp_path / "res" / "r.json"
    code = main(["run", "--adapter", str(adapter), "--base", str(base), "--output", f"dir:{tmp_path / 'out'}",
                 "--verify", "weights", "--result", str(result), "--quiet"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    (ran,) = json.loads(result.read_text())["results"]
    assert ran["verified"] is True and ran["report"]["outputs"] is None  # weights only, as the Action's `weights`
    parse = build_parser().parse_args
    for flags, verify in ((["--verify", "full"], {"enabled": True, "outputs": True}),
                          (["--verify", "off"], {"enabled": False, "outputs": False}),
                          (["--no-verify"], {"enabled": False, "outputs": False})):  # fmt: skip
        assert run_overrides(parse(["run", "--adapter", "org/a", "--output", "org/m", *flags]))["verify"] == verify
    assert "verify" not in run_overrides(parse(["run", "--adapter", "org/a", "--output", "org/m"]))


def test_dtype_aliases(tiny, capsys) -> None:
    parse = build_parser().parse_args
    for alias, name in (("bf16", "bfloat16"), ("FP16", "float16"), ("fp32", "float32"), ("float16", "float16")):
        assert parse(["plan", "--base", "b", "--adapter", "a", "--dtype", alias]).dtype == name
        assert parse(["run", "--adapter", "org/a", "--output", "org/m", "--dtype", alias]).dtype == name
        assert parse([*VERIFY, "--dtype", alias]).dtype == name
    base, adapter = tiny
    assert main(["plan", "--base", str(base), "--adapter", str(adapter), "--dtype", "bf16", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert {t["dtype"] for t in plan["tensors"]} == {"BF16"}


def test_a_closed_stdout_ends_quietly(tiny, monkeypatch, capsys) -> None:
    class Closed(io.StringIO):
        def write(self, text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

    base, adapter = tiny
    monkeypatch.setattr(sys, "stdout", Closed())
    assert main(["plan", "--base", str(base), "--adapter", str(adapter), "--json"]) == 141
    monkeypatch.undo()
    assert capsys.readouterr().err == ""


def test_a_broken_connection_is_still_a_network_error(tiny, monkeypatch, capsys) -> None:
    import loraship.engine.merge

    def broken(*args: object, **kwargs: object) -> None:
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(loraship.engine.merge, "prepare_merge", broken)
    base, adapter = tiny
    assert main(["plan", "--base", str(base), "--adapter", str(adapter)]) == 1
    assert capsys.readouterr().err.startswith("Error: Cannot reach the network: BrokenPipeError")


@pytest.mark.slow
def test_pipe_closed_by_head_exits_141_without_a_message(tiny) -> None:
    base, adapter = tiny
    child = subprocess.Popen([sys.executable, "-m", "loraship", "plan", "--base", str(base), "--adapter", str(adapter),
                              "--json", "--all"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    assert child.stdout is not None and child.stderr is not None
    child.stdout.close()  # the reader is gone before the plan is printed
    err = child.stderr.read()
    assert (child.wait(timeout=120), err) == (141, b"")


@pytest.mark.slow
def test_library_warnings_and_bars_only_when_asked(tiny, tmp_path: Path) -> None:
    base, adapter = tiny

    def merge(*flags: str) -> str:
        out = tmp_path / f"out{len(flags)}"
        done = subprocess.run([sys.executable, "-m", "loraship", "merge", "--base", str(base), "--adapter",
                               str(adapter), "--output", str(out), *flags], capture_output=True, text=True,
                              timeout=300, check=True)  # fmt: skip
        return done.stderr

    assert merge() == ""  # stderr is a pipe: no bar (no carriage return), no warning from PEFT or transformers
    loud = merge("-v", "--progress")
    assert "UserWarning: The PEFT config's `base_model_name_or_path` was renamed" in loud
    assert "Merging: " in loud  # the bar


def test_hostile_base_and_tag_flags_are_usage_errors(capsys) -> None:
    assert fails(capsys, "run", "--adapter", "org/a", "--base", "acme/..", "--output", "org/m") == (2, (
        "Error: --base: 'acme/..' is not a repo id the Hub accepts (huggingface_hub: Repo id must use alphanumeric "
        "chars, '-', '_' or '.'. The name cannot start or end with '-' or '.' and the maximum length is 96: "
        "'acme/..').\n"
        "Fix: Pass --base org/name (a Hub repo, optionally @revision) or a local folder as ./path.\n"
    ))  # fmt: skip
    fix = "Fix: Pass --tag a name such as v1.0 (letters, digits, `.`, `-`, `_`, `/`; no spaces, no `..`).\n"
    assert fails(capsys, "run", "--adapter", "org/a", "--output", "org/m", "--tag", "v1\nv2") == (2, (
        "Error: --tag: 'v1\\nv2' is not a tag name git and the Hub accept (it has the control character '\\n').\n" + fix
    ))  # fmt: skip
    assert fails(capsys, "run", "--adapter", "org/a", "--output", "org/m", "--tag", "../../../etc") == (2, (
        "Error: --tag: '../../../etc' is not a tag name git and the Hub accept (it has `..`).\n" + fix
    ))  # fmt: skip
    assert fails(capsys, "run", "--adapter", "org/a", "--output", "org/m", "--tag", "v" * 300) == (2, (
        f"Error: --tag: {'v' * 60!r}… (300 characters) is not a tag name git and the Hub accept (it has a part longer "
        "than 255 bytes).\n" + fix
    ))  # fmt: skip
