"""What the command line prints: plans, merge and run results, as text or as JSON for scripts.

It sits above the library (it reads merge and pipeline results); nothing in the library imports it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from loraship.engine.adapter import settings_summary
from loraship.engine.merge import MergeResult, PreparedMerge
from loraship.engine.plan import LoraBiasStep, LoraStep, MethodStep, ReplaceStep, ScalesStep, Step, TensorPlan
from loraship.run.pipeline import RunResult
from loraship.text import human_bytes, table


def format_plan(prepared: PreparedMerge, *, show_all: bool = False) -> str:
    plan = prepared.plan
    adapter = prepared.adapter
    shown = plan.tensors if show_all else plan.changed
    rows = [(t.name, "x".join(map(str, t.shape)) or "scalar", t.dtype, t.describe()) for t in shown]
    ignored = sum(1 for v in plan.accounting.values() if v.startswith("(ignored"))
    base = prepared.base
    out = [
        f"Base:    {prepared.base_dir} ({len(base.tensors)} tensors, {human_bytes(base.total_bytes)})",
        f"Adapter: {prepared.adapter_dir} ({adapter.method}: {settings_summary(adapter)}; "
        f"{len(adapter.tensors)} tensors)",
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


def plan_json(prepared: PreparedMerge) -> dict[str, Any]:
    """``loraship plan --json``: the plan for scripts; the same facts as the table, structured."""
    plan, adapter, base = prepared.plan, prepared.adapter, prepared.base
    ignored = {k: v for k, v in plan.accounting.items() if v.startswith("(ignored")}
    return {
        "base": {"path": str(prepared.base_dir), "tensors": len(base.tensors), "bytes": base.total_bytes},
        "adapter": {
            "path": str(prepared.adapter_dir),
            "method": adapter.method,
            "peft_type": adapter.peft_type,
            "settings": settings_summary(adapter),
            **(
                {
                    "r": adapter.r,
                    "lora_alpha": adapter.lora_alpha,
                    "use_rslora": adapter.use_rslora,
                    "use_dora": adapter.use_dora,
                }
                if adapter.peft_type == "LORA"
                else {}
            ),
            "tensors": len(adapter.tensors),
        },
        "output": {
            "tensors": len(plan.tensors),
            "changed": len(plan.changed),
            "bytes": plan.total_bytes,
            "largest_tensor_bytes": plan.largest_tensor_bytes,
        },
        "tensors": [_tensor_json(t) for t in plan.tensors],
        "accounting": {"applied": len(plan.accounting) - len(ignored), "ignored": sorted(ignored)},
        "config_updates": dict(plan.config_updates),
        "notes": list(plan.notes),
    }


def _tensor_json(t: TensorPlan) -> dict[str, Any]:
    return {
        "name": t.name,
        "shape": list(t.shape),
        "dtype": t.dtype,
        "source": t.source.name if t.source else None,
        "source_dtype": t.source.dtype if t.source else None,
        "changed": t.changed,
        "change": t.describe(),
        "requantize": None if t.requantize is None else {"via": t.requantize.via, "block": list(t.requantize.block)},
        "steps": [_step_json(s) for s in t.steps],
    }


def _step_json(step: Step) -> dict[str, Any]:
    if isinstance(step, ReplaceStep):
        return {"kind": "replace", "tensor": step.tensor.name, "origin": step.origin}
    if isinstance(step, LoraStep):
        m = step.module
        out: dict[str, Any] = {"kind": "dora" if step.dora else "lora", "module": m.module, "param": m.param,
                               "rank": m.rank, "alpha": m.alpha, "scale": m.scale, "layout": step.layout}  # fmt: skip
        if step.part is not None:
            p = step.part
            out["expert"] = {"fused": p.fused, "index": p.expert, "start": p.start, "length": p.length}
        return out
    if isinstance(step, MethodStep):
        mm = step.module
        return {"kind": mm.method.lower(), "module": mm.module, "param": step.param, "settings": dict(mm.settings),
                "tensors": [info.name for _, info in mm.tensors]}  # fmt: skip
    if isinstance(step, LoraBiasStep):
        return {"kind": "lora_bias", "module": step.module.module, "scale": step.module.scale}
    if isinstance(step, ScalesStep):
        return {"kind": "requantized_scales", "weight": step.weight}
    return {"kind": "token_rows", "rows": len(step.update.indices)}
