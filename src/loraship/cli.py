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
from loraship.errors import LorashipError

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

    merge = sub.add_parser("merge", help="merge an adapter into its base model, writing a model folder")
    _inputs(merge)
    merge.add_argument("--output", required=True, type=Path, metavar="OUT_DIR", help="merged model folder to write")
    merge.add_argument("--max-shard-size", default="5GB", help="largest output shard (default: 5GB)")
    merge.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists and is not empty")
    merge.add_argument("--quiet", action="store_true", help="no progress bar")

    demo = sub.add_parser("demo", help="offline end-to-end run: tiny model + adapter, merged and checked against PEFT")
    demo.add_argument("--workdir", type=Path, help="keep the generated files here (default: a temporary folder)")
    return parser


def _inputs(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", required=True, type=Path, metavar="BASE_DIR", help="base model folder")
    p.add_argument("--adapter", required=True, type=Path, metavar="ADAPTER_DIR", help="PEFT adapter folder")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="keep", help="output dtype (default: keep)")
    p.add_argument(
        "--allow-pickle", action="store_true", help="accept pickled .bin weights (loaded with weights_only=True)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``loraship`` command; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "plan":
            return cmd_plan(args)
        if args.command == "merge":
            return cmd_merge(args)
        if args.command == "demo":
            from loraship.demo import run_demo

            return run_demo(args.workdir)
        raise AssertionError(args.command)  # pragma: no cover
    except LorashipError as e:
        print(f"Error: {e.message}", file=sys.stderr)
        if e.fix:
            print(f"Fix: {e.fix}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("Interrupted: nothing was written.", file=sys.stderr)
        return 130
    except Exception:
        traceback.print_exc()
        print("Internal error: this is a bug in loraship. Please report it with the traceback above.", file=sys.stderr)
        return 2


def cmd_plan(args: argparse.Namespace) -> int:
    import tempfile

    from loraship.merge import prepare_merge
    from loraship.report import format_plan

    with tempfile.TemporaryDirectory(prefix="loraship-scratch-") as scratch:
        prepared = prepare_merge(
            args.base, args.adapter, dtype=_dtype(args.dtype), allow_pickle=args.allow_pickle, scratch=Path(scratch)
        )
        print(format_plan(prepared, show_all=args.all))
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from loraship.merge import merge
    from loraship.report import format_merge_result

    result = merge(
        args.base,
        args.adapter,
        args.output,
        dtype=_dtype(args.dtype),
        max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
        allow_pickle=args.allow_pickle,
        progress=not args.quiet,
    )
    print(format_merge_result(result))
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
