"""Job configuration: sources, loraship.yaml, flags, errors naming the key and the line."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraship.errors import ConfigError
from loraship.run.job import MergeJob, Source, job_from_values, load_jobs, parse_output, parse_source


def test_sources(tmp_path: Path, monkeypatch) -> None:
    assert parse_source("org/name") == Source(repo_id="org/name")
    assert parse_source("org/name@v1.2") == Source(repo_id="org/name", revision="v1.2")
    assert parse_source("./adapters/x") == Source(path=Path("adapters/x"))
    assert parse_source("/abs/x") == Source(path=Path("/abs/x"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert parse_source("org/name") == Source(path=Path("org/name"))  # an existing folder wins
    with pytest.raises(ValueError, match="is neither a Hub repo id"):
        parse_source("not a repo")
    assert parse_output("dir:./out") == Source(path=Path("out"))
    assert parse_output("org/merged") == Source(repo_id="org/merged")
    with pytest.raises(ValueError, match="dir: needs a path"):
        parse_output("dir:")


def test_single_job_file_and_overrides(tmp_path: Path) -> None:
    config = tmp_path / "loraship.yaml"
    config.write_text("adapter: org/lora@v1\noutput: org/merged\npublish:\n  tag: v1\n")
    (job,) = load_jobs(config, {"publish": {"mode": "pr"}, "private": True}).values()
    assert (job.name, job.adapter, job.private) == ("default", "org/lora@v1", True)
    assert (job.publish.mode, job.publish.tag) == ("pr", "v1")  # nested keys merge, not replace


def test_several_jobs(tmp_path: Path) -> None:
    config = tmp_path / "loraship.yaml"
    config.write_text("jobs:\n  a:\n    adapter: org/a\n    output: org/a-merged\n"
                      "  b:\n    adapter: org/b\n    output: dir:./b\n    dtype: bfloat16\n")  # fmt: skip
    jobs = load_jobs(config)
    assert list(jobs) == ["a", "b"]
    assert jobs["b"].output_target.is_local and jobs["b"].dtype == "bfloat16"


def test_job_hash_changes_with_what_shapes_the_files() -> None:
    job = MergeJob(adapter="org/a@v1", output="org/m")
    assert job.job_hash() == MergeJob(adapter="org/a@v2", output="org/m", private=True).job_hash()
    assert job.job_hash() != MergeJob(adapter="org/a", output="org/m", dtype="bfloat16").job_hash()
    assert job.job_hash() != MergeJob(adapter="org/a", output="org/m", card={"tags": ["x"]}).job_hash()


def test_to_yaml_round_trip(tmp_path: Path) -> None:
    job = MergeJob(name="chat", adapter="org/a@v1", output="org/m", publish={"tag": "v1"}, verify={"outputs": False})
    (tmp_path / "j.yaml").write_text(job.to_yaml())
    assert load_jobs(tmp_path / "j.yaml")["chat"] == job


def test_bad_yaml_names_the_line(tmp_path: Path) -> None:
    config = tmp_path / "loraship.yaml"
    config.write_text("jobs:\n  a:\n    adapter: org/a\n   output: org/m\n")
    with pytest.raises(ConfigError) as e:
        load_jobs(config)
    assert e.value.message.startswith(f"`{config}` line 4 is not valid YAML: ")


def test_missing_file_and_empty_jobs(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load_jobs(tmp_path / "nope.yaml")
    assert (
        e.value.message == f"Cannot read the job configuration `{tmp_path / 'nope.yaml'}`: No such file or directory."
    )
    (tmp_path / "empty.yaml").write_text("jobs: {}\n")
    with pytest.raises(ConfigError, match="`jobs` holds no jobs"):
        load_jobs(tmp_path / "empty.yaml")


def test_values_from_flags() -> None:
    with pytest.raises(ConfigError) as e:
        job_from_values({"adapter": "org/a"})
    assert str(e.value) == (
        "The job given on the command line has 1 problem(s):\n  `output` is required\n"
        "Fix: Give --output (or a --config file); see `loraship run --help`."
    )
    with pytest.raises(ConfigError) as e:
        job_from_values({"adapter": "not a repo", "output": "org/m", "max_shard_size": "5XB"})
    assert "  `adapter`: 'not a repo' is neither a Hub repo id" in str(e.value)
    assert "  `max_shard_size`: '5XB' is not a size (use e.g. 5GB or 500MB)" in str(e.value)
    assert e.value.fix == "Correct the values named above; see `loraship run --help`."


def test_dtype_aliases_take_their_canonical_names(tmp_path: Path) -> None:
    config = tmp_path / "loraship.yaml"
    config.write_text("adapter: org/a\noutput: org/m\ndtype: bf16\nverify:\n  dtype: FP32\n")
    (job,) = load_jobs(config).values()
    assert (job.dtype, job.verify.dtype) == ("bfloat16", "float32")
    assert job_from_values({"adapter": "org/a", "output": "org/m", "dtype": "fp16"}).dtype == "float16"
    assert job.job_hash() == MergeJob(adapter="org/a", output="org/m", dtype="bfloat16").job_hash()
    with pytest.raises(ConfigError) as e:
        job_from_values({"adapter": "org/a", "output": "org/m", "dtype": "int8"})
    assert "  `dtype`: input should be 'keep', 'bfloat16', 'float16' or 'float32' (got 'int8')" in str(e.value)


def test_repo_ids_the_hub_would_refuse_are_refused_up_front(tmp_path: Path) -> None:
    """`acme/..` has the shape `org/name` but huggingface_hub's own rules refuse it: refused naming the key."""
    with pytest.raises(ValueError) as e:
        parse_source("acme/..")
    assert str(e.value) == (
        "'acme/..' is not a repo id the Hub accepts (huggingface_hub: Repo id must use alphanumeric chars, '-', '_' "
        "or '.'. The name cannot start or end with '-' or '.' and the maximum length is 96: 'acme/..')"
    )
    with pytest.raises(ValueError, match=r"^'acme/a--b' is not a repo id the Hub accepts \(huggingface_hub: Cannot "):
        parse_output("acme/a--b")
    config = tmp_path / "loraship.yaml"
    config.write_text("adapter: org/lora\nbase: acme/x.git\noutput: org/merged\n")
    with pytest.raises(ConfigError) as c:
        load_jobs(config)
    assert c.value.message == (
        f"`{config}` has 1 problem(s):\n"
        f"  line 2: `base`: 'acme/x.git' is not a repo id the Hub accepts (huggingface_hub: Repo_id cannot end by "
        "'.git': 'acme/x.git')"
    )


@pytest.mark.parametrize(
    ("tag", "problem"),
    [
        ("v1\nv2", "the control character '\\n'"),
        ("../../../etc", "`..`"),
        ("a" * 300, "a part longer than 255 bytes"),
        ("v1.lock", "a part that ends with `.lock`"),
        ("v 1", "the character ' '"),
    ],
)
def test_tags_git_or_the_hub_would_refuse_are_refused_up_front(tmp_path: Path, tag: str, problem: str) -> None:
    import yaml

    config = tmp_path / "loraship.yaml"
    config.write_text(yaml.safe_dump({"adapter": "org/lora", "output": "org/merged", "publish": {"tag": tag}}))
    with pytest.raises(ConfigError) as e:
        load_jobs(config)
    shown = repr(tag) if len(tag) <= 60 else f"{tag[:60]!r}… ({len(tag)} characters)"
    assert f"`publish.tag`: {shown} is not a tag name git and the Hub accept (it has {problem})" in e.value.message
    with pytest.raises(ConfigError) as e:
        job_from_values({"adapter": "org/a", "output": "org/m", "publish": {"tag": tag}}, source="the action's inputs")
    assert e.value.message == (
        "The job given on the action's inputs has 1 problem(s):\n"
        f"  `publish.tag`: {shown} is not a tag name git and the Hub accept (it has {problem})"
    )
    assert MergeJob(adapter="org/a", output="org/m", publish={"tag": "v1.0-rc.1/ü"}).publish.tag == "v1.0-rc.1/ü"
