"""``MergeJob``: what to merge, where to publish it, how to check it. Validated once, frozen.

Jobs come from ``loraship.yaml`` (one file can hold several, under ``jobs:``), from command-line
flags, or from the GitHub Action's inputs; flags fill or override the same fields. Unknown keys and
wrong types are errors that name the key and the file line.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from loraship.errors import ConfigError, InputError
from loraship.text import canonical_dtype, parse_size, show, tag_problem

#: The shape of a Hub repo id, ``org/name`` (:func:`repo_id_problem` holds the Hub's own rules).
REPO_ID_PATTERN = r"[A-Za-z0-9][\w.\-]*/[\w.\-]+"
_REPO_ID = re.compile(REPO_ID_PATTERN)


def repo_id_problem(repo_id: str) -> str | None:
    """Why the Hub would refuse ``repo_id`` (huggingface_hub's own ``validate_repo_id``), or None."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id  # type: ignore[attr-defined]

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        return str(e).rstrip(".")
    return None


class RepoIdRefused(ValueError):
    """A name shaped as ``org/name`` that the Hub refuses as a repo id (``acme/..``): ``problem`` says why."""

    def __init__(self, repo_id: str, problem: str) -> None:
        self.repo_id, self.problem = repo_id, problem
        super().__init__(f"{repo_id!r} is not a repo id the Hub accepts (huggingface_hub: {problem})")


def check_repo_id(repo_id: str) -> str:
    """``repo_id``, if the Hub accepts it as a repo id.

    Raises:
        RepoIdRefused: It does not.
    """
    problem = repo_id_problem(repo_id)
    if problem is not None:
        raise RepoIdRefused(repo_id, problem)
    return repo_id


@dataclass(frozen=True)
class Source:
    """Where a model or adapter comes from: a Hub repo (at a revision) or a local folder."""

    repo_id: str | None = None
    revision: str | None = None
    path: Path | None = None

    @property
    def is_local(self) -> bool:
        return self.path is not None

    def __str__(self) -> str:
        if self.path is not None:
            return str(self.path)
        return f"{self.repo_id}@{self.revision}" if self.revision else str(self.repo_id)


def parse_source(text: str) -> Source:
    """``org/name``, ``org/name@revision``, or a local folder (``./x``, ``/x``, ``~/x``, or an existing folder).

    Raises:
        ValueError: Neither a repo id nor a local folder.
    """
    text = text.strip()
    if text.startswith(("./", "../", "/", "~")) or text in (".", "..") or Path(text).expanduser().is_dir():
        return Source(path=Path(text).expanduser())
    repo, _, revision = text.partition("@")
    if _REPO_ID.fullmatch(repo) and ("@" not in text or revision):
        return Source(repo_id=check_repo_id(repo), revision=revision or None)
    raise ValueError(
        f"{text!r} is neither a Hub repo id (`org/name`, optionally `@revision`) nor an existing local folder "
        "(write local folders as ./path or /path)"
    )


def parse_output(text: str) -> Source:
    """``org/name`` (a Hub repo) or ``dir:PATH`` (write the repo's folder locally)."""
    text = text.strip()
    if text.startswith("dir:"):
        if not text[4:]:
            raise ValueError("dir: needs a path, e.g. dir:./merged")
        return Source(path=Path(text[4:]).expanduser())
    if _REPO_ID.fullmatch(text):
        return Source(repo_id=check_repo_id(text))
    raise ValueError(f"{text!r} is neither a Hub repo id (`org/name`) nor `dir:PATH`")


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PublishSpec(_Spec):
    """How the merged model is published."""

    mode: Literal["commit", "pr"] = "commit"
    tag: str | None = None
    commit_message: str | None = None
    gated: Literal["inherit", "auto", "manual", "off"] = "inherit"

    @field_validator("tag")
    @classmethod
    def _tag(cls, value: str | None) -> str | None:
        problem = tag_problem(value) if value is not None else None
        if problem is not None:
            raise ValueError(f"{show(value or '')} is not a tag name git and the Hub accept (it has {problem})")
        return value


class VerifySpec(_Spec):
    """How the merged model is checked before publishing (see ``loraship verify``)."""

    enabled: bool = True
    outputs: bool = True
    prompts: list[str | list[dict[str, str]]] | str | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    max_error_ratio: float | None = Field(default=None, ge=0)  # as --max-error-ratio: 0 is a zero error budget
    min_top1: float | None = Field(default=None, ge=0, le=1)
    generation_tokens: int | None = Field(default=None, ge=0)
    weight_atol: float = Field(default=0.0, ge=0)
    #: Memory the output check's models may take (e.g. ``1GB``); the other layers are read from disk.
    max_memory: str | None = None

    @field_validator("dtype", mode="before")
    @classmethod
    def _dtype_alias(cls, value: Any) -> Any:
        return canonical_dtype(value) if isinstance(value, str) else value

    @field_validator("max_memory")
    @classmethod
    def _memory_size(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                parse_size(value)
            except InputError as e:
                raise ValueError(f"{value!r} is not a size (use e.g. 1GB or 800MB)") from e
        return value

    @property
    def max_memory_bytes(self) -> int | None:
        return parse_size(self.max_memory) if self.max_memory is not None else None

    def threshold_overrides(self) -> dict[str, float | int]:
        values = {
            "max_error_ratio": self.max_error_ratio,
            "min_top1": self.min_top1,
            "generation_tokens": self.generation_tokens,
        }
        return {k: v for k, v in values.items() if v is not None}


class CardSpec(_Spec):
    """What the generated model card adds."""

    tags: list[str] = Field(default_factory=list)
    language: list[str] = Field(default_factory=list)
    extra: str | None = None

    @field_validator("language", mode="before")
    @classmethod
    def _one_language(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


#: Output shards of a run whose job sets no ``max_shard_size``: a streaming run holds two of them on
#: disk at once (one written, one uploading), so they are kept small; transformers and serving
#: engines load any number of shards through the index.
RUN_SHARD_SIZE = "1GB"


class MergeJob(_Spec):
    """One merge: an adapter, its base, where the result goes, how it is checked and described."""

    name: str = "default"
    adapter: str
    base: str | None = None
    output: str
    dtype: Literal["keep", "bfloat16", "float16", "float32"] = "keep"
    requantize: bool = False
    private: bool = False
    publish: PublishSpec = Field(default_factory=PublishSpec)
    verify: VerifySpec = Field(default_factory=VerifySpec)
    card: CardSpec = Field(default_factory=CardSpec)
    allow_pickle: bool = False
    trust_remote_code: bool = False
    #: Largest output shard; None: :data:`RUN_SHARD_SIZE`.
    max_shard_size: str | None = None

    @field_validator("dtype", mode="before")
    @classmethod
    def _dtype_alias(cls, value: Any) -> Any:  # bf16, fp16, fp32 as their canonical names
        return canonical_dtype(value) if isinstance(value, str) else value

    @field_validator("adapter")
    @classmethod
    def _adapter(cls, value: str) -> str:
        parse_source(value)
        return value

    @field_validator("base")
    @classmethod
    def _base(cls, value: str | None) -> str | None:
        if value is not None:
            parse_source(value)
        return value

    @field_validator("output")
    @classmethod
    def _output(cls, value: str) -> str:
        parse_output(value)
        return value

    @field_validator("max_shard_size")
    @classmethod
    def _shard_size(cls, value: str | None) -> str | None:
        try:
            if value is not None:
                parse_size(value)
        except InputError as e:
            raise ValueError(f"{value!r} is not a size (use e.g. 5GB or 500MB)") from e
        return value

    @property
    def shard_size(self) -> str:
        """The output shards' size limit this job writes."""
        return self.max_shard_size or RUN_SHARD_SIZE

    @property
    def adapter_source(self) -> Source:
        return parse_source(self.adapter)

    @property
    def base_source(self) -> Source | None:
        return parse_source(self.base) if self.base else None

    @property
    def output_target(self) -> Source:
        return parse_output(self.output)

    def job_hash(self) -> str:
        """A short hash of everything that shapes the published files, besides the inputs' SHAs."""
        shaping = {
            "adapter": self.adapter_source.repo_id or "local",
            "base": self.base_source.repo_id if self.base_source else None,
            "dtype": self.dtype,
            **({"requantize": True} if self.requantize else {}),
            # Jobs that set none hash as they did when the default was 5GB: the same model, sharded finer, is
            # the same publication (a rerun after an upgrade does not publish it again).
            "max_shard_size": self.max_shard_size or "5GB",
            "card": self.card.model_dump(),
        }
        return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:12]

    def to_yaml(self) -> str:
        """The job as loraship.yaml would hold it (defaults left out), for 'how to reproduce'."""
        import yaml

        data = self.model_dump(exclude_defaults=True, exclude={"name"})
        return str(yaml.safe_dump({"jobs": {self.name: data}}, sort_keys=False, allow_unicode=True))


# --------------------------------------------------------------------------- loraship.yaml


def load_jobs(path: Path, overrides: Mapping[str, Any] | None = None) -> dict[str, MergeJob]:
    """Every job of a ``loraship.yaml``, with ``overrides`` (nested keys) applied to each.

    The file holds either ``jobs: {name: {...}}`` or one job's keys at the top level.

    Raises:
        ConfigError: Unreadable file, bad YAML, unknown keys, wrong types (with the file line).
    """
    data, lines = read_yaml(path, what="job configuration", flag="--config", name="loraship.yaml")
    if not isinstance(data, dict):
        raise ConfigError(f"`{path}` does not hold a mapping of jobs.", fix="Start it with `jobs:` (see the README).")
    if "jobs" in data:
        jobs_data = data["jobs"]
        prefix: tuple[str, ...] = ("jobs",)
        if set(data) != {"jobs"}:
            extra = sorted(k for k in data if k != "jobs")
            raise ConfigError(
                f"`{path}` line {lines.get((extra[0],), 1)}: unknown key `{extra[0]}` next to `jobs`.",
                fix="Put every job's settings under `jobs: <name>:`.",
                file=path,
                line=lines.get((extra[0],), 1),
            )
        if not isinstance(jobs_data, dict) or not jobs_data:
            raise ConfigError(f"`{path}`: `jobs` holds no jobs.", fix="Add at least one job under `jobs:`.")
    else:
        jobs_data, prefix = {"default": data}, ()
    jobs: dict[str, MergeJob] = {}
    problems: list[str] = []
    for name, raw in jobs_data.items():
        job_path: tuple[str, ...] = (*prefix, str(name)) if prefix else ()
        if not isinstance(raw, dict):
            problems.append(f"line {lines.get(job_path, 1)}: job `{name}` is not a mapping of settings")
            continue
        merged = _deep_update(dict(raw), overrides or {})
        try:
            jobs[str(name)] = MergeJob.model_validate({**merged, "name": str(name)})
        except ValidationError as e:
            problems.extend(describe_errors(e, job_path, lines))
    raise_problems(path, problems, fix="Correct the keys named above (the README lists every key of a job).")
    return jobs


def read_yaml(path: Path, *, what: str, flag: str, name: str) -> tuple[Any, dict[tuple[str, ...], int]]:
    """A YAML file's data and the line of every key (for messages that say where).

    Raises:
        ConfigError: The file cannot be read or is not valid YAML (with the line).
    """
    import yaml

    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(
            f"Cannot read the {what} `{path}`: {e.strerror or e}.", fix=f"Pass {flag} the path of your {name}."
        ) from e
    try:
        return yaml.safe_load(text), _key_lines(yaml.compose(text))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(
            f"`{path}`{where} is not valid YAML: {getattr(e, 'problem', None) or e}.",
            fix="Fix the YAML syntax (indentation, colons, quotes) at that line.",
            file=path,
            line=mark.line + 1 if mark is not None else None,
        ) from e


def raise_problems(path: Path, problems: list[str], *, fix: str) -> None:
    """One ConfigError listing every problem, in line order."""
    if problems:
        problems.sort(key=lambda p: int(p.split(":")[0].removeprefix("line ")) if p.startswith("line ") else 0)
        first = problems[0].split(":")[0]
        raise ConfigError(
            f"`{path}` has {len(problems)} problem(s):\n" + "\n".join(f"  {p}" for p in problems), fix=fix,
            file=path, line=int(first.removeprefix("line ")) if first.startswith("line ") else None,
        )  # fmt: skip


def job_from_values(values: Mapping[str, Any], *, source: str = "the command line", fix: str | None = None) -> MergeJob:
    """A job from flags or action inputs alone.

    ``fix``: what to do about invalid values (default: for flags, naming the missing ones).

    Raises:
        ConfigError: A value is missing or invalid.
    """
    try:
        return MergeJob.model_validate(dict(values))
    except ValidationError as e:
        problems = describe_errors(e, (), {})
        missing = [_flag(item["loc"]) for item in e.errors() if item["type"] == "missing"]
        if fix is None:
            fix = (
                f"Give {' and '.join(missing)} (or a --config file); see `loraship run --help`."
                if missing
                else "Correct the values named above; see `loraship run --help`."
            )
        raise ConfigError(
            f"The job given on {source} has {len(problems)} problem(s):\n" + "\n".join(f"  {p}" for p in problems),
            fix=fix,
        ) from e


def _flag(loc: tuple[int | str, ...]) -> str:
    """The `loraship run` flag of a job key (``output`` -> ``--output``)."""
    return "--" + str(loc[-1]).replace("_", "-")


def _deep_update(base: dict[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    for key, value in changes.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            base[key] = _deep_update(dict(base[key]), value)
        else:
            base[key] = value
    return base


def _key_lines(node: Any, path: tuple[str, ...] = ()) -> dict[tuple[str, ...], int]:
    """Line (1-based) of every key in a composed YAML document, by key path."""
    import yaml

    lines: dict[tuple[str, ...], int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key_path = (*path, str(key_node.value))
            lines[key_path] = key_node.start_mark.line + 1
            lines.update(_key_lines(value_node, key_path))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[(*path, str(i))] = item.start_mark.line + 1
            lines.update(_key_lines(item, (*path, str(i))))
    return lines


_KNOWN_KEYS = {
    (): sorted(k for k in MergeJob.model_fields if k != "name"),  # a job's name is its key under `jobs:`
    ("publish",): sorted(PublishSpec.model_fields),
    ("verify",): sorted(VerifySpec.model_fields),
    ("card",): sorted(CardSpec.model_fields),
}


def describe_errors(
    error: ValidationError,
    where: tuple[str, ...],
    lines: Mapping[tuple[str, ...], int],
    known_keys: Mapping[tuple[str, ...], list[str]] | None = None,
) -> list[str]:
    """pydantic's errors as ``line N: `key`: what is wrong`` lines."""
    problems = []
    known_keys = _KNOWN_KEYS if known_keys is None else known_keys
    for item in error.errors():
        loc = tuple(str(p) for p in item["loc"])
        # pydantic adds the union member tried (e.g. 'str') to locations: keep the user's keys only
        loc = tuple(p for p in loc if not p.startswith(("list[", "str", "dict[", "function-")))
        full = (*where, *loc)
        line = _line_for(full, lines)
        at = f"line {line}: " if line else ""
        key = ".".join(loc) or "(job)"
        if item["type"] == "extra_forbidden":
            known = known_keys.get(tuple(p for p in loc[:-1] if not p.isdigit()), [])
            hint = f" (known keys: {', '.join(known)})" if known else ""
            problems.append(f"{at}unknown key `{key}`{hint}")
        elif item["type"] == "missing":
            problems.append(f"{at}`{key}` is required")
        else:
            message = str(item["msg"]).removeprefix("Value error, ")
            given = item.get("input")
            shown = f" (got {given!r})" if given is not None and item["type"] != "value_error" else ""
            problems.append(f"{at}`{key}`: {message[0].lower() + message[1:]}{shown}")
    return problems


def _line_for(path: tuple[str, ...], lines: Mapping[tuple[str, ...], int]) -> int | None:
    while path:
        if path in lines:
            return lines[path]
        path = path[:-1]
    return None
