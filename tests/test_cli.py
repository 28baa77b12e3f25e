"""The README's commands: the demo runs offline and passes; --version answers."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraship import __version__
from loraship.cli import main


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
