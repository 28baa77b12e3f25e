"""Plain-text tables for the command line. Pure: values in, strings out."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from loraship.merge import MergeResult, PreparedMerge
    from loraship.pipeline import RunResult


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


def format_plan(prepared: PreparedMerge, *, show_all: bool = False) -> str:
    plan = prepared.plan
    adapter = prepared.adapter
    shown = plan.tensors if show_all else plan.changed
    rows = [(t.name, "x".join(map(str, t.shape)) or "scalar", t.dtype, t.describe()) for t in shown]
    ignored = sum(1 for v in plan.accounting.values() if v.startswith("(ignored"))
    base = prepared.base
    out = [
        f"Base:    {prepared.base_dir} ({len(base.tensors)} tensors, {human_bytes(base.total_bytes)})",
        f"Adapter: {prepared.adapter_dir} (LoRA r={adapter.r}, alpha={adapter.lora_alpha:g}"
        + (", rsLoRA" if adapter.use_rslora else "")
        + (", DoRA" if adapter.use_dora else "")
        + f"; {len(adapter.tensors)} tensors)",
        "",
        table(("tensor", "shape", "dtype", "change"), rows, wrap=(3,)) if rows else "No tensor changes.",
        "",
        f"{len(plan.changed)} of {len(plan.tensors)} output tensors change; "
        f"{len(plan.tensors) - len(plan.changed)} are copied unchanged. Output: {human_bytes(plan.total_bytes)}.",
        f"Every adapter tensor is accounted for: {len(plan.accounting) - ignored} applied"
        + (f", {ignored} ignored (PEFT bookkeeping copies)" if ignored else "")
        + ".",
    ]
    if plan.config_updates:
        changes = [
            f"{k} ({len(v)} labels)" if k == "id2label" else f"{k}={v}"
            for k, v in plan.config_updates.items()
            if k != "label2id"
        ]
        out.append(f"config.json changes: {', '.join(changes)}.")
    out.extend(f"Note: {n}" for n in plan.notes)
    return "\n".join(out)


def format_merge_result(result: MergeResult) -> str:
    plan = result.prepared.plan
    out = [
        f"Merged {result.prepared.adapter_dir} into {result.prepared.base_dir}",
        f"Wrote {result.output}: {len(result.weight_files)} weight file(s), {human_bytes(result.bytes_written)}, "
        f"{len(plan.changed)} of {len(plan.tensors)} tensors changed, in {result.seconds:.1f} s.",
        f"Other files: {', '.join(result.other_files) or 'none'}.",
    ]
    if result.left_out:
        out.append("Not carried over: " + "; ".join(f"{p} ({why})" for p, why in result.left_out) + ".")
    out.extend(f"Note: {n}" for n in plan.notes)
    return "\n".join(out)


def format_run_results(results: Sequence[RunResult]) -> str:
    rows = [
        (
            r.job,
            r.status,
            r.output,
            (r.commit_sha or "")[:12] or (r.pr_url or r.folder or ""),
            {True: "passed", False: "FAILED", None: "not run"}[r.verified],
        )
        for r in results
    ]
    out = [table(("job", "status", "output", "commit / PR / folder", "verification"), rows)]
    out.extend(r.message for r in results if r.message)
    return "\n".join(out)
