"""Plain-text helpers: tables, byte counts both ways, git ref names. Pure; below every layer but the errors."""

from __future__ import annotations

import re
from collections.abc import Sequence

from loraship.errors import InputError


def table(
    headers: Sequence[str], rows: Sequence[Sequence[object]], *, width: int = 100, wrap: Sequence[int] = ()
) -> str:
    """A left-aligned text table; the ``wrap`` columns are wrapped so that lines fit ``width``."""
    import textwrap

    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    floor = {i: max(12, len(str(headers[i]))) for i in wrap}
    while sum(widths) + 2 * (len(widths) - 1) > width:
        shrinkable = [i for i in wrap if widths[i] > floor[i]]
        if not shrinkable:
            break
        widest = max(shrinkable, key=lambda i: widths[i])
        widths[widest] -= 1
    lines: list[str] = []
    for n, row in enumerate(cells):
        parts = [textwrap.wrap(c, widths[i]) or [""] if i in wrap else [c] for i, c in enumerate(row)]
        for k in range(max(len(p) for p in parts)):
            line = [(p[k] if k < len(p) else "").ljust(w) for p, w in zip(parts, widths, strict=True)]
            lines.append("  ".join(line).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip


def parse_size(value: str | int, *, name: str = "--max-shard-size") -> int:
    """``5GB`` -> bytes (decimal units as transformers' ``max_shard_size``; ``GiB`` binary).

    ``name``: the flag or key the value was given as, for the message (e.g. ``--max-memory``).

    Raises:
        InputError: The value is not a positive size.
    """
    if isinstance(value, int):
        return value
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", value)
    unit = match.group(2).upper() if match else ""
    if not match or unit not in _SIZE_UNITS or float(match.group(1)) <= 0:
        raise InputError(f"{name} {value!r} is not a size.", fix="Use a number with a unit, e.g. 5GB or 500MB.")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


#: The dtype names loraship takes (PyTorch's), and the short names people write for them.
DTYPE_ALIASES = {
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "half": "float16",
    "float32": "float32", "fp32": "float32", "float": "float32",
}  # fmt: skip


def canonical_dtype(value: str) -> str:
    """``bf16`` -> ``bfloat16``, ``fp16`` -> ``float16``, ``fp32`` -> ``float32`` (any case); other values as given."""
    return DTYPE_ALIASES.get(value.strip().lower(), value)


def show(value: str, limit: int = 60) -> str:
    """``value`` quoted for a reason, cut at ``limit`` characters (with its length, when cut)."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}… ({len(value)} characters)"


#: Characters git's check-ref-format forbids anywhere in a ref name (besides ASCII control characters).
_REF_FORBIDDEN = " ~^:?*[\\"
#: Loose refs are files: a part of a ref name longer than this cannot be stored by git.
_REF_PART_BYTES = 255


def ref_problem(ref: str) -> str | None:
    """What breaks git's ``check-ref-format`` rules in ``ref`` (a full name, ``refs/...``), or None."""
    if not ref.startswith("refs/"):
        return "it does not start with `refs/`"
    if ref.endswith("/") or "//" in ref:
        return "an empty part"
    for char in ref:
        if ord(char) < 0x20 or ord(char) == 0x7F:
            return f"the control character {char!r}"
        if char in _REF_FORBIDDEN:
            return f"the character {char!r}"
    if ".." in ref:
        return "`..`"
    if "@{" in ref:
        return "`@{`"
    if ref.endswith("."):
        return "a `.` at the end"
    for part in ref.split("/"):
        if part.startswith("."):
            return "a part that starts with `.`"
        if part.endswith(".lock"):
            return "a part that ends with `.lock`"
        if len(part.encode("utf-8")) > _REF_PART_BYTES:
            return f"a part longer than {_REF_PART_BYTES} bytes"
    return None


def tag_problem(tag: str) -> str | None:
    """What keeps ``tag`` from naming a tag, ``refs/tags/<tag>``, by git's rules (the Hub's), or None."""
    if not tag.strip():
        return "no name in it"
    if tag == "@":
        return "only `@`"
    return ref_problem(f"refs/tags/{tag}")
