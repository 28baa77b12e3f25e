"""Plain-text helpers (tables, byte counts). Pure, and imports nothing of loraship: every module may use it."""

from __future__ import annotations

from collections.abc import Sequence


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
