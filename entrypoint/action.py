"""GitHub Action environment -> MergeJob -> ``loraship.run.pipeline.run`` -> outputs, summary, GitHub.

Inputs arrive as ``INPUT_<NAME>`` with hyphens kept (``INPUT_HF-TOKEN``); the ``_`` spelling is
accepted too. Tokens are masked (``::add-mask::``) before anything else is printed. Known failures
end with an ``::error::`` annotation that says how to fix it, the long form in the step summary,
a failure status on the commit, and exit code 1; anything else is a bug: exit code 2.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import traceback
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from loraship.errors import BUG_EXIT_CODE, ConfigError, InputError, LorashipError, known_failure, versions
from loraship.text import DTYPE_ALIASES

REPORT_NAME = "loraship-report.json"
#: The inputs action.yml declares (tests check the two agree).
INPUTS = (
    "config", "job", "adapter", "adapter-revision", "base", "output-repo", "hf-token", "hf-oidc-resource",
    "github-token", "dtype", "requantize", "private", "create-pr", "tag", "verify", "prompts", "device",
    "github-release",
)  # fmt: skip
_TRUE = {"true", "yes", "1", "on"}
_FALSE = {"false", "no", "0", "off"}


# --------------------------------------------------------------------------- workflow commands


class Commands:
    """Workflow commands on stdout (https://docs.github.com/actions/reference/workflow-commands)."""

    def __init__(self, out: IO[str]) -> None:
        self.out = out
        self._open = False

    def _emit(self, line: str) -> None:
        self.out.write(line + "\n")
        self.out.flush()

    def mask(self, secret: str) -> None:
        for line in secret.splitlines():
            if line.strip():
                self._emit(f"::add-mask::{line.strip()}")

    def group(self, name: str) -> None:
        self.endgroup()
        self._emit(f"::group::{_escape(name)}")
        self._open = True

    def endgroup(self) -> None:
        if self._open:
            self._emit("::endgroup::")
            self._open = False

    def error(self, title: str, message: str, *, file: str | None = None, line: int | None = None) -> None:
        where = f"file={_escape(file, prop=True)}," if file else ""
        where += f"line={line}," if file and line else ""
        self._emit(f"::error {where}title={_escape(title, prop=True)}::{_escape(message)}")

    def warning(self, title: str, message: str) -> None:
        self._emit(f"::warning title={_escape(title, prop=True)}::{_escape(message)}")

    def notice(self, message: str) -> None:
        self._emit(f"::notice::{_escape(message)}")

    def log(self, message: str) -> None:
        self._emit(message)


def _escape(text: str, *, prop: bool = False) -> str:
    text = text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")
    return text.replace(":", "%3A").replace(",", "%2C") if prop else text


# --------------------------------------------------------------------------- the runner's context


@dataclass(frozen=True)
class Context:
    """What the runner tells the action about the run."""

    workspace: Path
    event_tag: str | None
    sha: str | None
    repository: str | None
    run_url: str | None
    output_file: Path | None
    summary_file: Path | None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Context:
        ref = env.get("GITHUB_REF", "")
        tag = None
        if env.get("GITHUB_REF_TYPE") == "tag" or ref.startswith("refs/tags/"):
            tag = env.get("GITHUB_REF_NAME") or ref.removeprefix("refs/tags/")
        event = _event(env)
        if tag is None and str(event.get("ref", "")).startswith("refs/tags/"):
            tag = str(event["ref"]).removeprefix("refs/tags/")
        server, repository, run_id = (
            env.get("GITHUB_SERVER_URL"),
            env.get("GITHUB_REPOSITORY"),
            env.get("GITHUB_RUN_ID"),
        )
        run_url = f"{server}/{repository}/actions/runs/{run_id}" if server and repository and run_id else None
        return cls(
            workspace=Path(env.get("GITHUB_WORKSPACE") or os.getcwd()),
            event_tag=tag or None,
            sha=env.get("GITHUB_SHA") or event.get("after") or None,
            repository=repository,
            run_url=run_url,
            output_file=Path(env["GITHUB_OUTPUT"]) if env.get("GITHUB_OUTPUT") else None,
            summary_file=Path(env["GITHUB_STEP_SUMMARY"]) if env.get("GITHUB_STEP_SUMMARY") else None,
        )


def _event(env: Mapping[str, str]) -> dict[str, Any]:
    path = env.get("GITHUB_EVENT_PATH")
    if not path:
        return {}
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def read_input(env: Mapping[str, str], name: str) -> str | None:
    """``INPUT_HF-TOKEN`` as the runner sets it, or ``INPUT_HF_TOKEN``; empty means unset."""
    for key in (f"INPUT_{name.upper()}", f"INPUT_{name.upper().replace('-', '_')}"):
        value = env.get(key)
        if value is not None and value.strip():
            return value.strip()
    return None


def _bool(env: Mapping[str, str], name: str) -> bool | None:
    value = read_input(env, name)
    if value is None:
        return None
    if value.lower() in _TRUE | _FALSE:
        return value.lower() in _TRUE
    raise InputError(f"Input `{name}` must be true or false, got {value!r}.", fix=f"Set `{name}: true` or `false`.")


def _choice(
    env: Mapping[str, str], name: str, choices: tuple[str, ...], aliases: Mapping[str, str] | None = None
) -> str | None:
    value = read_input(env, name)
    if value is not None and aliases:
        value = aliases.get(value.lower(), value)  # e.g. dtype: bf16 -> bfloat16
    if value is None or value in choices:
        return value
    raise InputError(
        f"Input `{name}` must be one of {', '.join(choices)}, got {value!r}.",
        fix=f"Set `{name}:` to one of: {', '.join(choices)}.",
    )


# --------------------------------------------------------------------------- inputs -> job


def build_job(env: Mapping[str, str], ctx: Context) -> Any:
    """The MergeJob the inputs (and the config file, and a tag push) describe."""
    from loraship.run.job import job_from_values, load_jobs, parse_output, parse_source

    overrides: dict[str, Any] = {}
    for name, parse in (("adapter", parse_source), ("base", parse_source), ("output-repo", parse_output)):
        value = read_input(env, name)
        if value is not None:
            try:
                parse(value)
            except ValueError as e:
                raise InputError(f"Input `{name}`: {e}.", fix=f"Set `{name}:` to a repo id such as org/name.") from e
    adapter = read_input(env, "adapter")
    revision = read_input(env, "adapter-revision")
    if adapter:
        overrides["adapter"] = f"{adapter}@{revision}" if revision and "@" not in adapter else adapter
    for name, key in (("base", "base"), ("output-repo", "output")):
        if (value := read_input(env, name)) is not None:
            overrides[key] = value
    if (dtype := _choice(env, "dtype", ("keep", "bfloat16", "float16", "float32"), DTYPE_ALIASES)) is not None:
        overrides["dtype"] = dtype
    if (requantize := _bool(env, "requantize")) is not None:
        overrides["requantize"] = requantize
    if (private := _bool(env, "private")) is not None:
        overrides["private"] = private
    publish: dict[str, Any] = {}
    if _bool(env, "create-pr"):
        publish["mode"] = "pr"
    if (tag := read_input(env, "tag")) is not None:
        publish["tag"] = tag
    verify: dict[str, Any] = {}
    mode = _choice(env, "verify", ("true", "false", "weights"))
    if mode is not None:
        verify.update({"enabled": mode != "false", "outputs": mode == "true"})
    if (prompts := read_input(env, "prompts")) is not None:
        verify["prompts"] = str(ctx.workspace / prompts)
    if (device := _choice(env, "device", ("auto", "cpu", "cuda"))) is not None:
        verify["device"] = device
    if publish:
        overrides["publish"] = publish
    if verify:
        overrides["verify"] = verify

    config = read_input(env, "config")
    if config:
        jobs = load_jobs(ctx.workspace / config, overrides)
        job_name = read_input(env, "job")
        if job_name is None and len(jobs) > 1:
            raise ConfigError(
                f"`{config}` has several jobs ({', '.join(jobs)}): the action runs one.",
                fix="Set the `job` input to the one to run (use one step per job).",
            )
        if job_name is not None and job_name not in jobs:
            raise ConfigError(f"`{config}` has no job `{job_name}` (it has: {', '.join(jobs)}).",
                              fix="Set the `job` input to one of the names under `jobs:`.")  # fmt: skip
        job = jobs[job_name] if job_name else next(iter(jobs.values()))
    else:
        if "adapter" not in overrides or "output" not in overrides:
            missing = [n for n, k in (("adapter", "adapter"), ("output-repo", "output")) if k not in overrides]
            names = " and ".join(f"`{m}`" for m in missing)
            raise InputError(
                f"The action needs the input{'s' if len(missing) > 1 else ''} {names} (or a `config` file).",
                fix="Set `adapter: org/my-lora` and `output-repo: org/my-model` under `with:`, or `config: "
                "loraship.yaml`.",
            )
        job = job_from_values(
            overrides, source="the action's inputs", fix="Correct the inputs named above (action.yml describes each)."
        )
    source = parse_source(job.adapter)
    if source.repo_id and not source.revision and (revision or ctx.event_tag):
        # `adapter-revision`, else a pushed tag, names the revision of an adapter that names none
        job = job.model_copy(update={"adapter": f"{source.repo_id}@{revision or ctx.event_tag}"})
    if ctx.event_tag and job.publish.tag is None:  # a tag push also names the output tag
        job = job.model_copy(update={"publish": job.publish.model_copy(update={"tag": ctx.event_tag})})
    return job


# --------------------------------------------------------------------------- results -> GitHub


def write_outputs(ctx: Context, values: Mapping[str, str]) -> None:
    if ctx.output_file is None:
        return
    with ctx.output_file.open("a") as f:
        for name, value in values.items():
            delimiter = f"ghadelimiter_{uuid.uuid4()}"
            f.write(f"{name}<<{delimiter}\n{value}\n{delimiter}\n")


def write_report(ctx: Context, report: Mapping[str, Any]) -> Path:
    """The verification report as JSON in the workspace (for later steps and the release)."""
    path = ctx.workspace / REPORT_NAME
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return path


def write_summary(ctx: Context, markdown: str) -> None:
    if ctx.summary_file is not None:
        with ctx.summary_file.open("a") as f:
            f.write(markdown.rstrip() + "\n")


def result_outputs(result: Any, report_path: str) -> dict[str, str]:
    stats = (((result.report or {}).get("outputs") or {}).get("stats")) or {}
    return {
        "status": result.status,
        "repo-url": result.repo_url or "",
        "commit-sha": result.commit_sha or "",
        "tag": result.tag or "",
        "pr-url": result.pr_url or "",
        "verified": {True: "true", False: "false", None: ""}[result.verified],
        "report-path": report_path,
        "max-kl": "" if stats.get("max_kl") is None else f"{stats['max_kl']:.6g}",
        "top1-agreement": "" if stats.get("top1") is None else f"{stats['top1']:.6g}",
    }


def success_summary(result: Any) -> str:
    verb = {"published": "published", "already-published": "already published", "written": "written",
            "dry-run": "dry run"}[result.status]  # fmt: skip
    target = f"[{result.output}]({result.repo_url})" if result.repo_url else f"`{result.output}`"
    rows = [("Output", target), ("Base", f"`{result.base}`"), ("Adapter", f"`{result.adapter}`")]
    if result.commit_sha and result.repo_url:
        rows.append(("Commit", f"[`{result.commit_sha[:12]}`]({result.repo_url}/commit/{result.commit_sha})"))
    if result.pr_url:
        rows.append(("Pull request", result.pr_url))
    if result.tag:
        rows.append(("Tag", f"`{result.tag}`"))
    lines = [f"## loraship: {verb} {target}", "", "| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    lines += ["", result.message, ""]
    lines += [f"> {note}" for note in result.notes]
    if result.report_markdown:
        lines += ["", result.report_markdown]
    return "\n".join(lines)


def failure_summary(error: LorashipError) -> str:
    lines = [f"## loraship failed: {error.title}", "", error.message, ""]
    if error.fix:
        lines += [f"**How to fix it:** {error.fix}", ""]
    report = getattr(error, "report", None)
    if report is not None:
        lines.append(report.to_markdown())
    return "\n".join(lines)


def report_to_github(env: Mapping[str, str], ctx: Context, *, state: str, description: str, url: str | None,
                     summary: str, report: Path | None, published: bool = False) -> list[str]:  # fmt: skip
    """Commit status, and the release when asked and something was published; returns what was done.

    A rerun that finds the merge already published leaves the release (and its report) as it is.
    """
    token = read_input(env, "github-token")
    if not token or not ctx.repository:
        return []
    from loraship.github import GitHub

    github = GitHub(token, ctx.repository)
    done = []
    if ctx.sha:
        github.set_status(ctx.sha, state, description, url or ctx.run_url)  # type: ignore[arg-type]
        done.append(f"set the commit status of {ctx.sha[:12]} to {state}")
    tag = ctx.event_tag
    if _bool(env, "github-release") and tag and published:
        release = github.release(tag, f"{tag}: {description}"[:120], summary, report)
        done.append(f"{'created' if release.created else 'updated'} the release {release.url}")
    return done


# --------------------------------------------------------------------------- main


def main(env: Mapping[str, str] | None = None, out: IO[str] | None = None) -> int:
    env = os.environ if env is None else env
    cmd = Commands(out or sys.stdout)
    for name in ("hf-token", "github-token"):  # before anything else is printed
        if (secret := read_input(env, name)) is not None:
            cmd.mask(secret)
    ctx = Context.from_env(env)
    try:
        return _run(env, ctx, cmd)
    except LorashipError as error:
        cmd.endgroup()
        file, line = _where(error, ctx)
        cmd.error(error.title, error.message + (f"\nFix: {error.fix}" if error.fix else ""), file=file, line=line)
        summary = failure_summary(error)
        write_summary(ctx, summary)
        report = getattr(error, "report", None)
        if report is not None:
            write_outputs(ctx, {"verified": "false", "report-path": write_report(ctx, report.to_json()).name})
        try:
            report_to_github(env, ctx, state="failure", description=f"{error.title}: {error.message}", url=None,
                             summary=summary, report=None)  # fmt: skip
        except LorashipError as github_error:
            cmd.error(github_error.title, github_error.message + f"\nFix: {github_error.fix}")
        return 1
    except Exception as error:
        known = known_failure(error)
        if known is not None:  # the network: a known failure, not a bug
            cmd.endgroup()
            cmd.error(known.title, known.message + f"\nFix: {known.fix}")
            write_summary(ctx, failure_summary(known))
            return 1
        cmd.endgroup()
        details = traceback.format_exc()
        cmd.log(details)
        cmd.error("loraship crashed (a bug)", "An unexpected error stopped the action: see the log above, and "
                  f"please report it with the traceback and these versions: {versions()}.")  # fmt: skip
        write_summary(ctx, "## loraship crashed (a bug)\n\n```\n" + details + "```\n\n" + versions() + "\n")
        return BUG_EXIT_CODE


def _where(error: LorashipError, ctx: Context) -> tuple[str | None, int | None]:
    """A config error's file (relative to the workspace, as GitHub annotates it) and line."""
    file = getattr(error, "file", None)
    if not isinstance(error, ConfigError) or file is None:
        return None, None
    path = Path(file)
    with contextlib.suppress(ValueError):
        path = path.resolve().relative_to(Path(ctx.workspace).resolve())
    return str(path), error.line


def _run(env: Mapping[str, str], ctx: Context, cmd: Commands) -> int:
    from loraship.hub import Hub, hub_token
    from loraship.run.pipeline import run

    cmd.group("Configure")
    job = build_job(env, ctx)
    cmd.log(
        f"Job `{job.name}`: {job.adapter} -> {job.output}" + (f" (tag {job.publish.tag})" if job.publish.tag else "")
    )
    token = read_input(env, "hf-token") or env.get("HF_TOKEN") or None
    resource = read_input(env, "hf-oidc-resource")
    if resource is not None:  # trusted publishing: huggingface_hub exchanges the job's OIDC token
        if read_input(env, "hf-token") is not None:
            raise InputError(
                "Both `hf-token` and `hf-oidc-resource` are set: loraship would not know which to sign in with.",
                fix="Keep `hf-oidc-resource` for trusted publishing (no stored secret), or `hf-token`; not both.",
            )
        os.environ["HF_OIDC_RESOURCE"] = resource
        token = hub_token()
        if token:
            cmd.mask(token)
            cmd.log(f"Signed in by trusted publishing (a short-lived token scoped to `{resource}`).")
    if not job.output_target.is_local and token is None:
        raise InputError(
            f"Publishing to `{job.output}` needs a Hugging Face token, and the `hf-token` input is empty.",
            fix="Add `hf-token: ${{ secrets.HF_TOKEN }}` under `with:`, with a token that can write to the output "
            "repo (https://huggingface.co/settings/tokens), or publish without a stored secret: "
            "`hf-oidc-resource: <the output repo>` and `permissions: id-token: write` (trusted publishing).",
        )
    # without a token, the pipeline connects to the Hub by itself where the job needs it
    result = run(job, hub=Hub(token=token) if token else None, log=cmd.log, stage=cmd.group)
    cmd.endgroup()
    report = write_report(ctx, result.report) if result.report is not None else None
    write_outputs(ctx, result_outputs(result, report.name if report else ""))
    summary = success_summary(result)
    write_summary(ctx, summary)
    cmd.notice(result.message)
    url = result.pr_url or (f"{result.repo_url}/commit/{result.commit_sha}" if result.commit_sha else result.repo_url)
    verdict = {True: "verified", False: "NOT verified", None: "not verified"}[result.verified]
    description = f"{result.status.replace('-', ' ')}: {result.output} ({verdict})"
    try:  # the model is published: a GitHub failure now is a warning, not a failed step
        for line in report_to_github(env, ctx, state="success", description=description, url=url, summary=summary,
                                     report=report, published=result.status == "published"):  # fmt: skip
            cmd.log(f"GitHub: {line}")
    except LorashipError as github_error:
        cmd.warning(github_error.title, f"{result.message.rstrip('.')}; but {github_error.message}" +
                    (f"\nFix: {github_error.fix}" if github_error.fix else ""))  # fmt: skip
    return 0
