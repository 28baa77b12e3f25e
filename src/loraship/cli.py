"""The ``loraship`` command: parse arguments, call the library, turn known failures into messages.

``main(argv)`` is callable from tests; it returns the exit code, as the README's exit codes say:

- **0** done;
- **1** a known failure (:class:`~loraship.errors.LorashipError`): what failed, and a ``Fix:`` line;
- **2** a usage error (argparse's convention): an unknown or misspelled flag, a missing argument, a value
  out of range, an output path that cannot be written; checked when the arguments are parsed, before
  any work, and said with a ``Fix:`` line (:class:`~loraship.errors.UsageError`);
- **70** a bug (:data:`~loraship.errors.BUG_EXIT_CODE`): its traceback, and the versions to report it with;
- **130** interrupted (Ctrl-C);
- **141** stdout was closed by its reader (``loraship plan --json | head``): the command stops quietly,
  as a program killed by SIGPIPE does (128 + 13: what the shell reports for ``yes | head``).

Library warnings users cannot act on (PEFT's renamed ``base_model_name_or_path``, transformers'
deprecations) are hidden while a command runs unless ``-v``; progress bars are drawn only on a
terminal unless ``--progress``.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import os
import re
import sys
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn, TextIO

from loraship import __version__
from loraship.errors import BUG_EXIT_CODE, LorashipError, UsageError, known_failure, versions
from loraship.text import canonical_dtype

DTYPE_CHOICES = ("keep", "bfloat16", "float16", "float32")
#: Exit code when stdout is closed early: 128 + SIGPIPE, as a program the signal killed.
BROKEN_PIPE_EXIT_CODE = 141
#: Library warnings hidden unless -v: they name nothing the user can change.
_HIDDEN_WARNINGS: tuple[tuple[str, type[Warning]], ...] = (
    (r"The PEFT config's `base_model_name_or_path` was renamed", UserWarning),
    ("", FutureWarning),
)


def _dtype(value: str) -> str | None:
    return None if value == "keep" else value


# --------------------------------------------------------------------------- the parser


class Parser(argparse.ArgumentParser):
    """argparse, with its usage errors as :class:`UsageError` (a message and a ``Fix:``, exit 2), and an
    unknown flag named, with the closest known one."""

    def error(self, message: str) -> NoReturn:
        problem, fix = _usage_problem(self.prog, message, self._commands())
        raise UsageError(problem, fix=fix)

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        if args is not None:
            self._refuse_unknown_flags(args)
            args = self._join_negative_values(args)
        return super().parse_known_args(args, namespace)

    def _commands(self) -> str:
        names = [n for a in self._actions if isinstance(a, argparse._SubParsersAction) for n in a.choices]
        return ", ".join(names)

    def _join_negative_values(self, args: Sequence[str]) -> list[str]:
        """``--weight-atol -1e-3`` as ``--weight-atol=-1e-3``: argparse takes ``-1e-3`` for a flag, and
        would say the flag has no value rather than that the value is out of range."""
        joined: list[str] = []
        for token in args:
            action = self._option_string_actions.get(joined[-1]) if joined else None
            if action is not None and action.nargs is None and token.startswith("-") and _is_number(token):
                joined[-1] = f"{joined[-1]}={token}"
            else:
                joined.append(token)
        return joined

    def _refuse_unknown_flags(self, args: Sequence[str]) -> None:
        """Before argparse reads them: a flag this (sub)command does not have, named (argparse would
        say only that a required flag is missing, when the unknown one is its misspelling)."""
        known = self._option_string_actions
        top = self._subparsers is not None
        for token in args:
            if token == "--" or (top and not token.startswith("-")):
                break  # the rest belongs to the subcommand, whose parser checks it
            if not token.startswith("-") or token == "-" or " " in token or _is_number(token):
                continue  # a value (argparse's own rules), checked with its flag
            flag = token.split("=", 1)[0]
            if flag in known or (
                self.allow_abbrev and flag.startswith("--") and any(o.startswith(flag) for o in known)
            ):
                continue  # a known flag, or a prefix argparse resolves (or calls ambiguous)
            longs = sorted({o for o in known if o.startswith("--")})
            close = difflib.get_close_matches(flag, longs, n=1, cutoff=0.6)
            raise UsageError(
                f"`{self.prog}` has no flag {flag}.",
                fix=(f"Did you mean {close[0]}? " if close else "") + f"See `{self.prog} --help` for its flags.",
            )


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _usage_problem(prog: str, message: str, commands: str) -> tuple[str, str]:
    """argparse's error message, and the fix that matches it."""
    help_hint = f"see `{prog} --help`"
    if m := re.fullmatch(r"the following arguments are required: (.+)", message):
        names = m.group(1)
        if names == "COMMAND":
            return "`loraship` needs a command.", f"Run `loraship COMMAND ...`, COMMAND one of: {commands}."
        return f"`{prog}` needs {names}.", f"Give {names.replace(', ', ' and ')}; {help_hint}."
    if m := re.fullmatch(r"argument (.+?): invalid choice: (.+?) \(choose from (.+)\)", message):
        flag, value, choices = m.group(1), m.group(2).strip("'\""), [c.strip("'\" ") for c in m.group(3).split(",")]
        close = difflib.get_close_matches(value, choices, n=1, cutoff=0.5)
        hint = f"Did you mean {close[0]}? " if close else ""
        if flag == "COMMAND":
            return f"`loraship` has no command `{value}`.", f"{hint}The commands are: {', '.join(choices)}."
        return (
            f"{flag} {value!r} is not one of: {', '.join(choices)}.",
            f"{hint}Pass {flag} one of: {', '.join(choices)}.",
        )
    if m := re.fullmatch(r"argument (.+?): expected one argument", message):
        return f"{m.group(1)} needs a value.", f"Put the value right after {m.group(1)}; {help_hint}."
    if m := re.fullmatch(r"argument (.+?): not allowed with argument (.+)", message):
        return (
            f"{m.group(1)} and {m.group(2)} contradict each other.",
            f"Give either {m.group(1)} or {m.group(2)}, not both.",
        )
    if m := re.fullmatch(r"argument (.+?): invalid (int|float) value: (.+)", message):
        kind = "a whole number" if m.group(2) == "int" else "a number"
        return f"{m.group(1)} {m.group(3)} is not {kind}.", f"Give {m.group(1)} {kind}; {help_hint}."
    if m := re.fullmatch(r"ambiguous option: (\S+) could match (.+)", message):
        return f"{m.group(1)} is short for several flags: {m.group(2)}.", f"Write the whole flag: one of {m.group(2)}."
    if m := re.fullmatch(r"unrecognized arguments: (.+)", message):
        return (
            f"Unexpected argument(s): {m.group(1)}.",
            "Remove them, or add the flag whose value they are; see `loraship COMMAND --help`.",
        )
    return f"{prog}: {message}.", f"{help_hint[0].upper()}{help_hint[1:]}."


def _number(
    flag: str, kind: type[int] | type[float], wanted: str, example: str, *, low: float, high: float | None = None
) -> Callable[[str], float | int]:  # fmt: skip
    """A value of ``kind`` in ``[low, high]``, or a UsageError naming ``flag``
    and saying what it takes (``wanted``, e.g. "a fraction from 0 to 1")."""

    def parse(text: str) -> float | int:
        try:
            value: float | None = kind(text)
        except ValueError:
            value = None
        if (
            value is None
            or value != value  # NaN
            or value < low
            or (high is not None and value > high)
        ):
            raise UsageError(f"{flag} {text!r} is not {wanted}.", fix=f"Give {flag} {wanted}, e.g. {flag} {example}.")
        return value

    return parse


_WEIGHT_ATOL = _number("--weight-atol", float, "a number >= 0", "1e-6", low=0)
# 0: the outputs must match exactly (a zero error budget)
_MAX_ERROR_RATIO = _number("--max-error-ratio", float, "a number >= 0", "0.05", low=0)
_MIN_TOP1 = _number("--min-top1", float, "a fraction from 0 to 1", "0.95", low=0, high=1)
_GENERATION_TOKENS = _number("--generation-tokens", int, "a whole number >= 0 (0 skips the generation check)", "32",
                             low=0)  # fmt: skip
_PORT = _number("--port", int, "a port number from 0 to 65535", "8080", low=0, high=65535)


def _size(flag: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        from loraship.errors import InputError
        from loraship.text import parse_size

        try:
            parse_size(text, name=flag)
        except InputError as e:
            raise UsageError(e.message, fix=e.fix) from e
        return text

    return parse


def _writable_folder(flag: str, path: Path, folder: Path, wanted: str) -> None:
    """``folder``'s nearest existing one is a folder this process can write (missing ones are created)."""
    for ancestor in (folder, *folder.parents):
        if ancestor.exists() or ancestor.is_symlink():
            if not ancestor.is_dir():
                raise UsageError(f"{flag} `{path}`: `{ancestor}` is a file, not a folder.",
                                 fix=f"Pass {flag} {wanted} (missing folders are created).")  # fmt: skip
            if not os.access(ancestor, os.W_OK | os.X_OK):
                raise UsageError(f"{flag} `{path}`: the folder `{ancestor}` is not writable.",
                                 fix=f"Pass {flag} {wanted} in a folder you can write to.")  # fmt: skip
            return


def _out_file(flag: str, example: str) -> Callable[[str], Path]:
    """An output file: not a folder, in a folder that exists or can be created (created when written)."""

    def parse(text: str) -> Path:
        path = Path(text).expanduser()
        wanted = f"a file path, e.g. {flag} {example}"
        if path.is_dir():
            raise UsageError(f"{flag} `{path}` is a folder.", fix=f"Pass {flag} {wanted}.")
        _writable_folder(flag, path, path.parent, wanted)
        return path

    return parse


def _out_folder(flag: str) -> Callable[[str], Path]:
    """A working folder: an existing folder, or one that can be created."""

    def parse(text: str) -> Path:
        path = Path(text).expanduser()
        if path.exists() and not path.is_dir():
            raise UsageError(f"{flag} `{path}` is a file, not a folder.",
                             fix=f"Pass {flag} a folder (it is created if missing), or leave {flag} out to use a "
                             "temporary folder.")  # fmt: skip
        _writable_folder(flag, path, path, "a folder")
        return path

    return parse


def _tag(text: str) -> str:
    from loraship.text import show, tag_problem

    problem = tag_problem(text)
    if problem is not None:
        raise UsageError(
            f"--tag: {show(text)} is not a tag name git and the Hub accept (it has {problem}).",
            fix="Pass --tag a name such as v1.0 (letters, digits, `.`, `-`, `_`, `/`; no spaces, no `..`).",
        )
    return text


def _source(flag: str, output: bool = False) -> Callable[[str], str]:
    def parse(text: str) -> str:
        from loraship.run.job import parse_output, parse_source

        try:
            (parse_output if output else parse_source)(text)
        except ValueError as e:
            fix = (
                f"Pass {flag} org/name (a Hub repo) or {flag} dir:PATH (a local folder)."
                if output
                else f"Pass {flag} org/name (a Hub repo, optionally @revision) or a local folder as ./path."
            )
            raise UsageError(f"{flag}: {e}.", fix=fix) from e
        return text

    return parse


def _dtype_arg(text: str) -> str:
    return canonical_dtype(text)


_DTYPE_HELP = "bf16, fp16, fp32 for short"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="loraship",
        description="Merge a LoRA adapter into its base model by streaming safetensors; verify; publish.",
    )
    parser.add_argument("--version", action="version", version=f"loraship {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    plan = sub.add_parser("plan", help="show what a merge will change, tensor by tensor (reads no tensor data)")
    _inputs(plan)
    plan.add_argument("--all", action="store_true", help="list unchanged tensors too")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON (every tensor) for scripts")
    _verbose(plan)

    merge = sub.add_parser("merge", help="merge an adapter into its base model, writing a model folder")
    _inputs(merge)
    merge.add_argument("--output", required=True, type=Path, metavar="OUT_DIR", help="merged model folder to write")
    merge.add_argument("--max-shard-size", default="5GB", type=_size("--max-shard-size"),
                       help="largest output shard (default: 5GB)")  # fmt: skip
    merge.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists and is not empty")
    _progress(merge, "no progress bar")
    merge.add_argument(
        "--trust-remote-code", action="store_true",
        help="carry the base's Python files (remote code) into the merged folder (default: left out)",
    )  # fmt: skip
    _verbose(merge)

    verify = sub.add_parser(
        "verify", help="check that a merged folder behaves like base + adapter (weights, then outputs)"
    )
    verify.add_argument("--base", required=True, type=Path, metavar="BASE_DIR", help="base model folder")
    verify.add_argument("--adapter", required=True, type=Path, metavar="ADAPTER_DIR", help="PEFT adapter folder")
    verify.add_argument("--merged", required=True, type=Path, metavar="MERGED_DIR", help="merged model folder")
    verify.add_argument("--prompts", type=Path, help="prompts: one per line, or .json / .jsonl (default: built in)")
    verify.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: cuda if available")
    verify.add_argument(
        "--dtype", choices=("auto", "bfloat16", "float16", "float32"), default="auto", type=_dtype_arg,
        help=f"dtype to run the models in ({_DTYPE_HELP}; default: the merged model's)",
    )  # fmt: skip
    verify.add_argument("--report", type=_out_file("--report", "report.json"), metavar="JSON",
                        help="write the report as JSON here")  # fmt: skip
    verify.add_argument("--markdown", type=_out_file("--markdown", "report.md"), metavar="MD",
                        help="write the report as Markdown here")  # fmt: skip
    verify.add_argument("--weights-only", action="store_true", help="skip the output-level comparison")
    verify.add_argument("--max-memory", metavar="SIZE", type=_size("--max-memory"),
                        help="memory the output check's models may take (e.g. 1GB); the other layers are read from "
                        "disk as they run (default: each model whole in memory)")  # fmt: skip
    verify.add_argument("--weight-atol", type=_WEIGHT_ATOL, default=0.0,
                        help="accept merged weights within this |Δ| (>= 0; default 0: bit-identical)")  # fmt: skip
    verify.add_argument(
        "--max-error-ratio", type=_MAX_ERROR_RATIO,
        help="override the dtype's limit on merge error / adapter effect (>= 0)",
    )  # fmt: skip
    verify.add_argument("--min-top1", type=_MIN_TOP1,
                        help="override the dtype's top-1 agreement threshold (a fraction, 0..1)")  # fmt: skip
    verify.add_argument(
        "--generation-tokens",
        type=_GENERATION_TOKENS,
        help="greedy tokens that must match (default 32; 0 skips the generation check)",
    )  # fmt: skip
    verify.add_argument(
        "--trust-remote-code", action="store_true",
        help="let transformers run Python code shipped in the model repo (only for repos you trust)",
    )  # fmt: skip
    verify.add_argument("--allow-pickle", action="store_true", help="accept pickled .bin weights")
    _progress(verify, "no progress (bars, model loads)")
    _verbose(verify)

    run = sub.add_parser(
        "run", help="the main job: pull base and adapter from the Hub, merge, verify, publish one commit"
    )
    run.add_argument("--config", type=Path, help="loraship.yaml with one or more jobs")
    run.add_argument("--job", help="run only this job of the config file")
    run.add_argument("--adapter", type=_source("--adapter"),
                     help="adapter repo id (org/name[@revision]) or local folder")  # fmt: skip
    run.add_argument("--base", type=_source("--base"),
                     help="base repo id or local folder (default: the adapter's base_model_name_or_path)")  # fmt: skip
    run.add_argument("--output", type=_source("--output", output=True),
                     help="output repo id (org/name), or dir:PATH to write the repo's folder locally")  # fmt: skip
    run.add_argument("--dtype", choices=DTYPE_CHOICES, type=_dtype_arg,
                     help=f"output dtype ({_DTYPE_HELP}; default: keep)")  # fmt: skip
    run.add_argument(
        "--requantize", action="store_true", default=None,
        help="FP8 base: publish the changed weights in FP8 with the base's blocks (lossy; default: 16 bits)",
    )  # fmt: skip
    run.add_argument("--max-shard-size", type=_size("--max-shard-size"),
                     help="largest output shard (default: the job's max_shard_size, else 1GB)")  # fmt: skip
    run.add_argument("--private", action="store_true", default=None, help="create the output repo private")
    run.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    run.add_argument("--tag", type=_tag, help="tag the published commit")
    run.add_argument("--commit-message", help="commit title (the provenance is appended)")
    checks = run.add_mutually_exclusive_group()
    checks.add_argument("--verify", choices=("full", "weights", "off"),
                        help="full: weights and outputs; weights: weights only; off: publish unverified (not "
                        "recommended); as the Action's `verify` input (default: the job's, else full)")  # fmt: skip
    checks.add_argument("--no-verify", action="store_const", const="off", dest="verify",
                        help="the same as --verify off")  # fmt: skip
    run.add_argument(
        "--max-memory", metavar="SIZE", type=_size("--max-memory"),
        help="memory the output check's models may take (e.g. 1GB; verify.max_memory)",
    )  # fmt: skip
    run.add_argument("--dry-run", action="store_true", help="do everything but publish; keep the staged folder")
    run.add_argument("--no-stream", action="store_true",
                     help="download the whole base before merging (default: download, merge, check and upload "
                     "shard by shard)")  # fmt: skip
    run.add_argument("--overwrite", action="store_true", help="for dir: outputs, replace a non-empty folder")
    run.add_argument("--token", help="Hugging Face token (default: HF_TOKEN); never printed")
    run.add_argument("--workdir", type=_out_folder("--workdir"),
                     help="where to stage the merged folder (default: a temporary folder)")  # fmt: skip
    run.add_argument("--result", type=_out_file("--result", "result.json"), metavar="JSON",
                     help="write the run's results as JSON here")  # fmt: skip
    _progress(run, "no progress messages or bars")
    _verbose(run)

    serve = sub.add_parser("serve", help="the Hub webhook bot: merge when a watched adapter repo gets a new tag")
    serve.add_argument("--config", required=True, type=Path, help="bot.yaml (see examples/bot.yaml)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    serve.add_argument("--port", type=_PORT, default=8080,
                       help="port to listen on (default: 8080)")  # fmt: skip
    _verbose(serve)

    demo = sub.add_parser("demo", help="offline end-to-end run: tiny model + adapter, merged and checked against PEFT")
    demo.add_argument("--workdir", type=_out_folder("--workdir"),
                      help="keep the generated files here (default: a temporary folder)")  # fmt: skip
    _verbose(demo)
    return parser


def _inputs(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", required=True, type=Path, metavar="BASE_DIR", help="base model folder")
    p.add_argument("--adapter", required=True, type=Path, metavar="ADAPTER_DIR", help="PEFT adapter folder")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="keep", type=_dtype_arg,
                   help=f"output dtype ({_DTYPE_HELP}; default: keep)")  # fmt: skip
    p.add_argument(
        "--requantize", action="store_true",
        help="FP8 base: write the changed weights back in FP8 with the base's blocks (lossy; default: 16 bits)",
    )  # fmt: skip
    p.add_argument(
        "--allow-pickle", action="store_true", help="accept pickled .bin weights (loaded with weights_only=True)"
    )


def _progress(p: argparse.ArgumentParser, quiet_help: str) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument("--quiet", action="store_true", help=quiet_help)
    group.add_argument(
        "--progress",
        action="store_true",
        help="draw progress bars even when stderr is not a terminal (default: only on one)",
    )


def _verbose(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="store_true",
                   help="show the libraries' warnings (transformers, PEFT), hidden by default")  # fmt: skip


# --------------------------------------------------------------------------- running a command


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``loraship`` command; returns the exit code."""
    try:
        args = build_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    except UsageError as e:
        return _report(e)
    stdout = _Stdout(sys.stdout)
    try:
        with _library_output(bars=_bars(args), verbose=getattr(args, "verbose", False)), stdout:
            return _dispatch(args)
    except LorashipError as e:
        return _report(e)
    except KeyboardInterrupt:
        print("Interrupted: nothing was written.", file=sys.stderr)
        return 130
    except Exception as e:
        if isinstance(e, BrokenPipeError) and stdout.closed_by_reader:
            return BROKEN_PIPE_EXIT_CODE  # not a network failure: `| head` has read enough
        known = known_failure(e)
        if known is not None:
            return _report(known)
        return _bug()


def _dispatch(args: argparse.Namespace) -> int:
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


def _bug() -> int:
    traceback.print_exc()
    print(f"Internal error: this is a bug in loraship ({versions()}). Please report it with the traceback above "
          "and these versions.", file=sys.stderr)  # fmt: skip
    return BUG_EXIT_CODE


class _Stdout:
    """``sys.stdout`` while a command runs, noting whether its reader closed it (a write failed with a
    broken pipe), to tell ``loraship plan | head`` from a network connection that broke."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.closed_by_reader = False

    def write(self, text: str) -> int:
        try:
            return self.stream.write(text)
        except BrokenPipeError:
            self.closed_by_reader = True
            raise

    def flush(self) -> None:
        try:
            self.stream.flush()
        except BrokenPipeError:
            self.closed_by_reader = True
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)

    def __enter__(self) -> None:
        sys.stdout = self

    def __exit__(self, kind: type[BaseException] | None, *rest: object) -> None:
        if sys.stdout is self:
            sys.stdout = self.stream
        if not self.closed_by_reader:
            # What is still buffered, while a closed pipe can be told from a broken socket; a failure
            # already on its way wins.
            with contextlib.suppress(BrokenPipeError) if kind is not None else contextlib.nullcontext():
                self.flush()


def _bars(args: argparse.Namespace) -> bool:
    """Progress bars: with --progress; else on a terminal, unless --quiet."""
    if getattr(args, "progress", False):
        return True
    if getattr(args, "quiet", False):
        return False
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


@contextlib.contextmanager
def _library_output(*, bars: bool, verbose: bool) -> Iterator[None]:
    """While a command runs: the libraries' warnings hidden unless ``verbose``, their bars off unless ``bars``."""
    with warnings.catch_warnings():
        if not verbose:
            for message, category in _HIDDEN_WARNINGS:
                warnings.filterwarnings("ignore", message=message, category=category)
        if bars:
            yield
            return
        with _no_library_bars():
            yield


@contextlib.contextmanager
def _no_library_bars() -> Iterator[None]:
    """No progress bar from huggingface_hub (downloads, uploads) or transformers (loads); restored after."""
    saved = os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS")
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # libraries imported later, and child processes
    hub_was_on = False
    if "huggingface_hub" in sys.modules:
        from huggingface_hub import utils as hf_utils

        hub_was_on = not hf_utils.are_progress_bars_disabled()  # type: ignore[attr-defined]  # exported lazily
        hf_utils.disable_progress_bars()  # type: ignore[attr-defined]
    transformers_was_on = _transformers_bars(None)
    _transformers_bars(False)
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
        else:
            os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = saved
        if hub_was_on:
            from huggingface_hub import utils as hf_utils

            hf_utils.enable_progress_bars()  # type: ignore[attr-defined]
        if transformers_was_on:
            _transformers_bars(True)


def _transformers_bars(on: bool | None) -> bool:
    """Whether transformers draws bars (False when not imported); turn them on or off when ``on`` is given."""
    if "transformers" not in sys.modules:
        return False
    from transformers.utils import logging as hf_logging

    was = bool(hf_logging.is_progress_bar_enabled())
    if on is True:
        hf_logging.enable_progress_bar()
    elif on is False:
        hf_logging.disable_progress_bar()
    return was


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
        progress=_bars(args),
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
    verify: dict[str, object] = {}
    if args.verify is not None:  # as the Action's `verify` input: true, weights, false
        verify.update({"enabled": args.verify != "off", "outputs": args.verify == "full"})
    if args.max_memory and args.verify != "off":
        verify["max_memory"] = args.max_memory
    if verify:
        values["verify"] = verify
    return values


def check_run_args(args: argparse.Namespace) -> None:
    """What `loraship run` needs besides each flag's own value (checked before any work).

    Raises:
        UsageError: No --config and no --adapter or --output; --job without --config.
    """
    if args.job and not args.config:
        raise UsageError(
            "--job names a job of a --config file, and no --config is given.",
            fix="Add --config loraship.yaml (the file whose `jobs:` hold that name), or drop --job.",
        )
    if args.config:
        return
    wanted = {
        "--adapter": "--adapter org/name (a Hub repo, optionally @revision) or --adapter ./folder",
        "--output": "--output org/name (a Hub repo) or --output dir:PATH (a local folder)",
    }
    missing = [flag for flag, value in (("--adapter", args.adapter), ("--output", args.output)) if value is None]
    if missing:
        raise UsageError(
            f"`loraship run` needs {' and '.join(missing)} (or a --config file).",
            fix=f"Add {'; and '.join(wanted[m] for m in missing)}; or pass --config loraship.yaml.",
        )


def cmd_run(args: argparse.Namespace) -> int:
    import json

    from loraship.console import format_run_results
    from loraship.errors import ConfigError
    from loraship.run.job import job_from_values, load_jobs
    from loraship.run.pipeline import RunResult, run

    check_run_args(args)
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
            args.result.parent.mkdir(parents=True, exist_ok=True)
            args.result.write_text(json.dumps(data, indent=2) + "\n")

    for job in jobs.values():
        workdir = args.workdir / job.name if args.workdir else None
        try:
            results.append(run(job, hub=hub, workdir=workdir, dry_run=args.dry_run, overwrite=args.overwrite,
                               progress=_bars(args), stream=not args.no_stream, log=log))  # fmt: skip
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
        trust_remote_code=args.trust_remote_code, allow_pickle=args.allow_pickle, progress=_bars(args),
        max_memory=parse_size(args.max_memory, name="--max-memory") if args.max_memory else None,
    )  # fmt: skip
    print(render_text(report))
    for path in (args.report, args.markdown):
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
    write_report(report, json_path=args.report, markdown_path=args.markdown)
    raise_if_failed(report)
    return 0


def run() -> NoReturn:
    """Console entry point: ``main()``, then exit without the interpreter's teardown.

    Everything is written, closed and joined when ``main`` returns; unloading torch at exit would
    only add about half a second to every command. A reader that closed stdout early (``| head``)
    ends the command quietly with exit code 141, as the Python docs advise for SIGPIPE: what is
    still buffered goes to /dev/null instead.
    """
    code = main()
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        code = BROKEN_PIPE_EXIT_CODE
    with contextlib.suppress(OSError):
        sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    run()
