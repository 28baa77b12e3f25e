"""The ``loraship`` command: parse arguments, call the library, turn known failures into messages.

``main(argv)`` is callable from tests. Known failures (:class:`~loraship.errors.LorashipError`)
print what failed and how to fix it and exit with their code (1); anything else is a bug: its
traceback is printed and the exit code is 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from loraship import __version__
from loraship.errors import BUG_EXIT_CODE, LorashipError, known_failure, versions

DTYPE_CHOICES = ("keep", "bfloat16", "float16", "float32")


def _dtype(value: str) -> str | None:
    return None if value == "keep" else value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loraship",
        description="Merge a LoRA adapter into its base model by streaming safetensors; verify; publish.",
    )
    parser.add_argument("--version", action="version", version=f"loraship {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    plan = sub.add_parser("plan", help="show what a merge will change, tensor by tensor (reads no tensor data)")
    _inputs(plan)
    plan.add_argument("--all", action="store_true", help="list unchanged tensors too")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON (every tensor) for scripts")

    merge = sub.add_parser("merge", help="merge an adapter into its base model, writing a model folder")
    _inputs(merge)
    merge.add_argument("--output", required=True, type=Path, metavar="OUT_DIR", help="merged model folder to write")
    merge.add_argument("--max-shard-size", default="5GB", help="largest output shard (default: 5GB)")
    merge.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists and is not empty")
    merge.add_argument("--quiet", action="store_true", help="no progress bar")
    merge.add_argument(
        "--trust-remote-code", action="store_true",
        help="carry the base's Python files (remote code) into the merged folder (default: left out)",
    )  # fmt: skip

    verify = sub.add_parser(
        "verify", help="check that a merged folder behaves like base + adapter (weights, then outputs)"
    )
    verify.add_argument("--base", required=True, type=Path, metavar="BASE_DIR", help="base model folder")
    verify.add_argument("--adapter", required=True, type=Path, metavar="ADAPTER_DIR", help="PEFT adapter folder")
    verify.add_argument("--merged", required=True, type=Path, metavar="MERGED_DIR", help="merged model folder")
    verify.add_argument("--prompts", type=Path, help="prompts: one per line, or .json / .jsonl (default: built in)")
    verify.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: cuda if available")
    verify.add_argument(
        "--dtype", choices=("auto", "bfloat16", "float16", "float32"), default="auto",
        help="dtype to run the models in (default: the merged model's)",
    )  # fmt: skip
    verify.add_argument("--report", type=Path, metavar="JSON", help="write the report as JSON here")
    verify.add_argument("--markdown", type=Path, metavar="MD", help="write the report as Markdown here")
    verify.add_argument("--weights-only", action="store_true", help="skip the output-level comparison")
    verify.add_argument("--max-memory", metavar="SIZE",
                        help="memory the output check's models may take (e.g. 1GB); the other layers are read from "
                        "disk as they run (default: each model whole in memory)")  # fmt: skip
    verify.add_argument("--weight-atol", type=float, default=0.0, help="accept merged weights within this |Δ|")
    verify.add_argument(
        "--max-error-ratio", type=float, help="override the dtype's limit on merge error / adapter effect"
    )
    verify.add_argument("--min-top1", type=float, help="override the dtype's top-1 agreement threshold (0..1)")
    verify.add_argument("--generation-tokens", type=int, help="greedy tokens that must match (default 32)")
    verify.add_argument(
        "--trust-remote-code", action="store_true",
        help="let transformers run Python code shipped in the model repo (only for repos you trust)",
    )  # fmt: skip
    verify.add_argument("--allow-pickle", action="store_true", help="accept pickled .bin weights")
    verify.add_argument("--quiet", action="store_true", help="no progress (bars, model loads)")

    run = sub.add_parser(
        "run", help="the main job: pull base and adapter from the Hub, merge, verify, publish one commit"
    )
    run.add_argument("--config", type=Path, help="loraship.yaml with one or more jobs")
    run.add_argument("--job", help="run only this job of the config file")
    run.add_argument("--adapter", help="adapter repo id (org/name[@revision]) or local folder")
    run.add_argument("--base", help="base repo id or local folder (default: the adapter's base_model_name_or_path)")
    run.add_argument("--output", help="output repo id (org/name), or dir:PATH to write the repo's folder locally")
    run.add_argument("--dtype", choices=DTYPE_CHOICES, help="output dtype (default: keep)")
    run.add_argument(
        "--requantize", action="store_true", default=None,
        help="FP8 base: publish the changed weights in FP8 with the base's blocks (lossy; default: 16 bits)",
    )  # fmt: skip
    run.add_argument("--max-shard-size", help="largest output shard (default: the job's max_shard_size, else 1GB)")
    run.add_argument("--private", action="store_true", default=None, help="create the output repo private")
    run.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    run.add_argument("--tag", help="tag the published commit")
    run.add_argument("--commit-message", help="commit title (the provenance is appended)")
    run.add_argument("--no-verify", action="store_true", help="publish without verification (not recommended)")
    run.add_argument(
        "--max-memory", metavar="SIZE", help="memory the output check's models may take (e.g. 1GB; verify.max_memory)"
    )
    run.add_argument("--dry-run", action="store_true", help="do everything but publish; keep the staged folder")
    run.add_argument("--no-stream", action="store_true",
                     help="download the whole base before merging (default: download, merge, check and upload "
                     "shard by shard)")  # fmt: skip
    run.add_argument("--overwrite", action="store_true", help="for dir: outputs, replace a non-empty folder")
    run.add_argument("--token", help="Hugging Face token (default: HF_TOKEN); never printed")
    run.add_argument("--workdir", type=Path, help="where to stage the merged folder (default: a temporary folder)")
    run.add_argument("--result", type=Path, metavar="JSON", help="write the run's results as JSON here")
    run.add_argument("--quiet", action="store_true", help="no progress bar")

    serve = sub.add_parser("serve", help="the Hub webhook bot: merge when a watched adapter repo gets a new tag")
    serve.add_argument("--config", required=True, type=Path, help="bot.yaml (see examples/bot.yaml)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8080, help="port to listen on (default: 8080)")

    demo = sub.add_parser("demo", help="offline end-to-end run: tiny model + adapter, merged and checked against PEFT")
    demo.add_argument("--workdir", type=Path, help="keep the generated files here (default: a temporary folder)")
    return parser


def _inputs(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", required=True, type=Path, metavar="BASE_DIR", help="base model folder")
    p.add_argument("--adapter", required=True, type=Path, metavar="ADAPTER_DIR", help="PEFT adapter folder")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="keep", help="output dtype (default: keep)")
    p.add_argument(
        "--requantize", action="store_true",
        help="FP8 base: write the changed weights back in FP8 with the base's blocks (lossy; default: 16 bits)",
    )  # fmt: skip
    p.add_argument(
        "--allow-pickle", action="store_true", help="accept pickled .bin weights (loaded with weights_only=True)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``loraship`` command; returns the exit code."""
    args = build_parser().parse_args(argv)
    if getattr(args, "quiet", False):
        quiet_libraries()
    try:
        if args.command == "plan":
            return cmd_plan(args)
        if args.command == "merge":
            return cmd_merge(args)
        if args.command == "verify":
            return cmd_verify(args)
        if args.command == "run":
            return cmd_run(args)
        if args.command == "serve":
            from loraship.bot.app import serve

            serve(args.config, host=args.host, port=args.port)
            return 0
        if args.command == "demo":
            from loraship.demo import run_demo

            return run_demo(args.workdir)
        raise AssertionError(args.command)  # pragma: no cover
    except LorashipError as e:
        return _report(e)
    except KeyboardInterrupt:
        print("Interrupted: nothing was written.", file=sys.stderr)
        return 130
    except Exception as e:
        known = known_failure(e)
        if known is not None:
            return _report(known)
        traceback.print_exc()
        print(f"Internal error: this is a bug in loraship ({versions()}). Please report it with the traceback above "
              "and these versions.", file=sys.stderr)  # fmt: skip
        return BUG_EXIT_CODE


def quiet_libraries() -> None:
    """``--quiet``: no progress bar from huggingface_hub (downloads, uploads) or transformers (loads)."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # child processes and libraries imported later
    from huggingface_hub import utils as hf_utils

    hf_utils.disable_progress_bars()  # type: ignore[attr-defined]  # exported lazily
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def _report(e: LorashipError) -> int:
    print(f"Error: {e.message}", file=sys.stderr)
    if e.fix:
        print(f"Fix: {e.fix}", file=sys.stderr)
    return e.exit_code


def cmd_plan(args: argparse.Namespace) -> int:
    import json
    import tempfile

    from loraship.console import format_plan, plan_json
    from loraship.engine.merge import prepare_merge

    with tempfile.TemporaryDirectory(prefix="loraship-scratch-") as scratch:
        prepared = prepare_merge(
            args.base, args.adapter, dtype=_dtype(args.dtype), allow_pickle=args.allow_pickle, scratch=Path(scratch)
        )
        if args.requantize:
            prepared = prepared.requantized()
        print(json.dumps(plan_json(prepared), indent=2) if args.json else format_plan(prepared, show_all=args.all))
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from loraship.console import format_merge_result
    from loraship.engine.merge import merge

    result = merge(
        args.base,
        args.adapter,
        args.output,
        dtype=_dtype(args.dtype),
        max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
        allow_pickle=args.allow_pickle,
        progress=not args.quiet,
        keep_code=args.trust_remote_code,
        requantize=args.requantize,
    )
    print(format_merge_result(result))
    return 0


def run_overrides(args: argparse.Namespace) -> dict[str, object]:
    """The job fields the `run` flags set (nested like loraship.yaml)."""
    values: dict[str, object] = {}
    for name in ("adapter", "base", "output", "dtype", "max_shard_size", "requantize", "private"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    publish: dict[str, object] = {}
    if args.create_pr:
        publish["mode"] = "pr"
    if args.tag:
        publish["tag"] = args.tag
    if args.commit_message:
        publish["commit_message"] = args.commit_message
    if publish:
        values["publish"] = publish
    if args.no_verify:
        values["verify"] = {"enabled": False}
    elif args.max_memory:
        values["verify"] = {"max_memory": args.max_memory}
    return values


def cmd_run(args: argparse.Namespace) -> int:
    import json

    from loraship.console import format_run_results
    from loraship.errors import ConfigError
    from loraship.run.job import job_from_values, load_jobs
    from loraship.run.pipeline import RunResult, run

    overrides = run_overrides(args)
    if args.config:
        jobs = load_jobs(args.config, overrides)
        if args.job:
            if args.job not in jobs:
                raise ConfigError(
                    f"`{args.config}` has no job `{args.job}` (it has: {', '.join(jobs)}).",
                    fix="Pass --job one of the names under `jobs:`.",
                )
            jobs = {args.job: jobs[args.job]}
    else:
        jobs = {"default": job_from_values(overrides)}
    hub = None
    if args.token:  # else each job that needs the Hub connects with HF_TOKEN
        from loraship.hub import Hub

        hub = Hub(token=args.token)
    log = (lambda message: None) if args.quiet else (lambda message: print(message, file=sys.stderr))
    results: list[RunResult] = []

    def record(error: dict[str, object] | None = None) -> None:
        if args.result:
            data: dict[str, object] = {"results": [r.to_json() for r in results]}
            if error is not None:
                data["error"] = error
            args.result.write_text(json.dumps(data, indent=2) + "\n")

    for job in jobs.values():
        workdir = args.workdir / job.name if args.workdir else None
        try:
            results.append(run(job, hub=hub, workdir=workdir, dry_run=args.dry_run, overwrite=args.overwrite,
                               progress=not args.quiet, stream=not args.no_stream, log=log))  # fmt: skip
        except Exception as error:  # the bot reads this to decide between retrying and giving up
            e = error if isinstance(error, LorashipError) else known_failure(error)
            if e is None:
                raise
            record({"job": job.name, "title": e.title, "message": e.message, "fix": e.fix, "transient": e.transient})
            raise e from (None if e is error else error)
        record()
    print(format_run_results(results))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from loraship.check.outputs import load_prompts
    from loraship.check.verify import raise_if_failed, render_text, verify, write_report
    from loraship.text import parse_size

    prompts = load_prompts(args.prompts) if args.prompts else None
    overrides: dict[str, float | int] = {
        name: value
        for name, value in (
            ("max_error_ratio", args.max_error_ratio),
            ("min_top1", args.min_top1),
            ("generation_tokens", args.generation_tokens),
        )
        if value is not None
    }
    report = verify(
        args.base, args.adapter, args.merged, outputs=not args.weights_only, prompts=prompts, device=args.device,
        dtype=args.dtype, threshold_overrides=overrides, weight_atol=args.weight_atol,
        trust_remote_code=args.trust_remote_code, allow_pickle=args.allow_pickle, progress=not args.quiet,
        max_memory=parse_size(args.max_memory) if args.max_memory else None,
    )  # fmt: skip
    print(render_text(report))
    write_report(report, json_path=args.report, markdown_path=args.markdown)
    raise_if_failed(report)
    return 0


def run() -> NoReturn:
    """Console entry point: ``main()``, then exit without the interpreter's teardown.

    Everything is written, closed and joined when ``main`` returns; unloading torch at exit would
    only add about half a second to every command.
    """
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    run()
