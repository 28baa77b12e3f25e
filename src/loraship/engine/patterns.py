"""The regular expressions an adapter_config.json hands PEFT, compiled and tried in bounded time.

PEFT matches several adapter_config.json fields against module names with Python's ``re``:
``target_modules`` and ``exclude_modules`` when they are a string (``re.fullmatch``), the keys of
``rank_pattern`` and ``alpha_pattern`` (``re.match(rf"(.*\\.)?({key})$", name)``, also loraship's
own per-module rank and alpha), each ``modules_to_save`` entry, and ``layers_pattern``. An adapter's
author writes them, and a pattern that backtracks catastrophically (``(.*.*.*)*X``) keeps ``re`` busy
for hours on a 20-character name, with no way to interrupt it from another thread.

So, before loraship or PEFT matches them, :func:`check_patterns` compiles every one of them the way
PEFT embeds it, and tries each against the module names in a child Python process (the very same
``re`` module PEFT uses, so the very same answers) that is killed at a deadline. A pattern that
does not compile, or does not finish in time, is refused with its field named; one that finishes
is then matched by PEFT and loraship in the same bounded time. Patterns without any repetition
(``*``, ``+``, ``?``, ``{``) cannot backtrack more than polynomially and are only compiled, here.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraship.errors import AdapterError

#: Seconds every pattern together may take, plus a little per (pattern, name) pair for huge models.
DEADLINE_S = 5.0
PER_MATCH_S = 20e-6


@dataclass(frozen=True)
class Pattern:
    """One regular expression PEFT builds from adapter_config.json.

    Attributes:
        what: How to name it in a message (```target_modules```, ``the `rank_pattern` key``).
        pattern: The pattern as the config writes it.
        regex: The expression PEFT matches (the pattern embedded in PEFT's own wrapper, if any).
        full: PEFT calls ``re.fullmatch`` (else ``re.match``).
    """

    what: str
    pattern: str
    regex: str
    full: bool


def peft_patterns(config: Mapping[str, Any]) -> list[Pattern]:
    """Every regular expression PEFT (and loraship) builds from ``config`` to match module names."""
    out: list[Pattern] = []
    for key in ("target_modules", "exclude_modules"):
        value = config.get(key)
        if isinstance(value, str):
            out.append(Pattern(f"`{key}`", value, value, True))
    for key in ("rank_pattern", "alpha_pattern"):
        value = config.get(key)
        if isinstance(value, dict):
            out.extend(Pattern(f"the `{key}` key", str(k), rf"(.*\.)?({k})$", False) for k in value)
    frequencies = config.get("n_frequency_pattern")  # FourierFT: re.match(rf".*\.{key}$", name)
    if isinstance(frequencies, dict):
        out.extend(Pattern("the `n_frequency_pattern` key", str(k), rf".*\.{k}$", False) for k in frequencies)
    feedforward = config.get("feedforward_modules")  # IA3: re.fullmatch when a string
    if isinstance(feedforward, str):
        out.append(Pattern("`feedforward_modules`", feedforward, feedforward, True))
    tokens = config.get("trainable_token_indices")
    if isinstance(tokens, dict):
        out.extend(Pattern("the `trainable_token_indices` key", str(k), rf"(.*\.)?({k})$", False) for k in tokens)
    saved = config.get("modules_to_save")
    if isinstance(saved, list):
        out.extend(Pattern("the `modules_to_save` entry", m, rf"(^|.*\.){m}($|\..*)", False)
                   for m in saved if isinstance(m, str))  # fmt: skip
    layers = config.get("layers_pattern")
    if config.get("layers_to_transform") is not None and isinstance(config.get("target_modules"), list) and layers:
        names = [layers] if isinstance(layers, str) else layers
        out.extend(Pattern("the `layers_pattern`", p, rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", False)
                   for p in names if isinstance(p, str))  # fmt: skip
    return out


def check_patterns(config: Mapping[str, Any], names: Iterable[str], *, where: Path | str) -> None:
    """Refuse a pattern of ``config`` that Python cannot compile, or cannot match against ``names``
    (module names) within the deadline.

    Raises:
        AdapterError: Naming the field and the pattern.
    """
    patterns = list(dict.fromkeys(peft_patterns(config)))
    slow = [p for p in patterns if any(c in p.pattern for c in "*+?{")]
    for p in patterns:
        if p not in slow:
            try:
                re.compile(p.regex)
            except (re.error, RecursionError, OverflowError) as e:
                raise _invalid(p, e, where) from e
    if not slow:
        return
    todo = sorted(set(names))
    deadline = DEADLINE_S + PER_MATCH_S * len(slow) * len(todo)
    request = json.dumps({"patterns": [[p.regex, p.full] for p in slow], "names": todo})
    try:
        done = subprocess.run(
            [sys.executable, "-I", "-S", "-c", _CHILD], input=request, capture_output=True, text=True,
            timeout=deadline, check=False,
        )  # fmt: skip
        output = done.stdout
    except subprocess.TimeoutExpired as e:
        started = _lines(e.stdout)
        culprit = slow[int(started[-1].split()[1])] if started and started[-1].startswith("start ") else slow[0]
        raise AdapterError(
            f"`{where}`: matching {culprit.what} `{_shown(culprit.pattern)}` against the model's module names did not "
            f"finish in {deadline:.0f} seconds: the pattern backtracks catastrophically in Python's re module, which "
            "PEFT matches it with, so PEFT would hang on it too.",
            fix="Rewrite the pattern without nested repetition (e.g. `.*\\.(q_proj|v_proj)` rather than "
            "`(.*.*)*_proj`), or list the module names instead.",
        ) from None
    for line in _lines(output):
        if line.startswith("error "):
            index, _, message = line[len("error ") :].partition(" ")
            raise _invalid(slow[int(index)], message, where)
    if done.returncode != 0 or "done" not in _lines(output):
        raise AdapterError(
            f"`{where}`: the module name patterns could not be tried (the matching process exited with "
            f"{done.returncode}: {(done.stderr.strip().splitlines() or ['no message'])[-1]}).",
            fix="Simplify the patterns in adapter_config.json (target_modules, rank_pattern, alpha_pattern).",
        )


def _invalid(p: Pattern, error: BaseException | str, where: Path | str) -> AdapterError:
    why = error if isinstance(error, str) else getattr(error, "msg", None) or type(error).__name__
    return AdapterError(
        f"`{where}`: {p.what} `{_shown(p.pattern)}` is not a valid regular expression ({why}).",
        fix="Correct the pattern (PEFT matches it against module names with Python's re module), or save the "
        "adapter again with save_pretrained().",
    )


def _shown(pattern: str) -> str:
    return pattern if len(pattern) <= 60 else pattern[:57] + "..."


def _lines(text: str | bytes | None) -> list[str]:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return (text or "").splitlines()


#: The child: compile each pattern, then match it against every name, saying which one it starts.
_CHILD = """
import json, re, sys
request = json.loads(sys.stdin.read())
names = request["names"]
for i, (regex, full) in enumerate(request["patterns"]):
    print("start", i, flush=True)
    try:
        compiled = re.compile(regex)
    except (re.error, RecursionError, OverflowError) as e:
        print("error", i, getattr(e, "msg", None) or type(e).__name__, flush=True)
        sys.exit(0)
    match = compiled.fullmatch if full else compiled.match
    for name in names:
        match(name)
print("done", flush=True)
"""
