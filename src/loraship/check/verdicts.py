"""From measurements to verdicts: the rows of the verification table, each with what was measured and
what it must be. Pure: reports in, :class:`~loraship.check.report.Check` rows out."""

from __future__ import annotations

from collections.abc import Sequence

from loraship.check.outputs import (
    OutputReport,
)
from loraship.check.report import Check
from loraship.check.weights import WeightReport, library_problems
from loraship.engine.oracle import OracleReport
from loraship.engine.safetensors_io import (
    Checkpoint,
)


def weight_checks(w: WeightReport) -> list[Check]:
    names = ", ".join(w.missing[:5] + w.extra[:5] + w.wrong_layout[:5])
    exactness = "bit-identical" if not w.close else "bit-identical (or within --weight-atol)"
    return [
        Check("weights", "tensor names, shapes, dtypes", not (w.missing or w.extra or w.wrong_layout),
              f"{w.tensors - len(w.missing)} of {w.tensors} as planned"
              + (f"; {len(w.missing)} missing, {len(w.extra)} extra, {len(w.wrong_layout)} different" if names else ""),
              "same as base + adapter", names),
        Check("weights", "adapter tensors applied", True,
              f"{w.adapter_applied} of {w.adapter_tensors}"
              + (f" ({w.adapter_ignored} PEFT bookkeeping copies ignored)" if w.adapter_ignored else ""),
              "every adapter tensor lands in the model"),
        Check("weights", "changed tensors recomputed", not w.mismatched,
              f"{w.exact} of {w.changed} bit-identical" + (f", {w.close} within tolerance" if w.close else "")
              + (f"; max |Δ| {w.max_abs_diff:.3g}" if w.max_abs_diff else ""),
              exactness, ", ".join(f"{n} (max |Δ| {d:.3g})" for n, d in w.mismatched[:5])),
        Check("weights", "untouched tensors", not w.untouched_mismatched,
              f"{w.untouched - len(w.untouched_mismatched)} of {w.untouched} byte-identical to the base",
              "byte-identical to the base", ", ".join(w.untouched_mismatched[:5])),
        Check("weights", "adapter changes present", not w.change_missing and not _no_op(w),
              f"{w.changed - w.same_as_base} of {w.changed} changed tensors differ from the base"
              + (" (a no-op merge)" if _no_op(w) else ""),
              "every tensor the adapter changes differs from the base", ", ".join(w.change_missing[:5])),
        Check("weights", "finite values", not w.non_finite,
              "no NaN or Inf" if not w.non_finite else f"NaN/Inf in {len(w.non_finite)} tensors",
              "no NaN or Inf", ", ".join(w.non_finite[:5])),
    ]  # fmt: skip


def names_check(names: OracleReport | None) -> Check:
    """Where transformers + PEFT put each adapter tensor, derived apart from the plan, against the plan."""
    required = "each adapter tensor where transformers + PEFT load it"
    if names is None or names.skipped:
        why = names.skipped if names is not None else "not run"
        return Check("weights", "names and tying (transformers + PEFT)", None, f"not checked: {why}", required)
    measured = f"{names.checked} adapter tensors placed as transformers + PEFT place them"
    if names.disagreements:
        measured = f"{len(names.disagreements)} disagreement(s) with transformers + PEFT"
    return Check("weights", "names and tying (transformers + PEFT)", names.agrees, measured, required,
                 "; ".join(names.disagreements[:3]))  # fmt: skip


def library_check(merged: Checkpoint) -> Check:
    """The merged shards as the safetensors library (what transformers and every engine use) reads them."""
    problems = [p for path in merged.files for p in library_problems(path, merged.tensors)]
    return library_result(problems, len(merged.files))


def library_result(problems: Sequence[str], n: int) -> Check:
    """The library check over ``n`` files."""
    measured = f"{n} of {n} files open" if not problems else f"{len(problems)} problem(s)"
    return Check("weights", "readable by the safetensors library", not problems, measured,
                 "every file opens, every tensor's shape as written", "; ".join(problems[:3]))  # fmt: skip


def _no_op(w: WeightReport) -> bool:
    return w.changed > 0 and w.same_as_base == w.changed


def _error_and_effect(o: OutputReport) -> tuple[float, float]:
    """Mean KL (logits) or mean |Δ| (other outputs) of the merge error and of the adapter's effect."""
    if o.logits:
        return o.stats.mean_kl or 0.0, o.effect.mean_kl or 0.0
    return o.stats.mean_abs, o.effect.mean_abs


def error_ratio(o: OutputReport) -> float | None:
    """Merge error relative to the adapter's effect; None when the adapter changes no output."""
    error, effect = _error_and_effect(o)
    return error / effect if effect > 1e-12 else None


def output_checks(o: OutputReport) -> list[Check]:
    t = o.thresholds
    assert t is not None
    if o.reference_problem is not None:
        return [Check("outputs", "reference (PEFT, unmerged)", None, f"not valid: {o.reference_problem}",
                      "base + adapter", "outputs not compared")]  # fmt: skip
    s = o.stats
    ratio = error_ratio(o)
    measure = "mean KL" if o.logits else "mean |Δ|"
    error, effect = _error_and_effect(o)
    if ratio is None:  # the adapter does not move the outputs: only an exact match is evidence
        passed = error <= 1e-9
        measured = f"{measure} {error:.3g}; the adapter does not change the base's outputs (untrained?)"
    else:
        passed = ratio <= t.max_error_ratio
        measured = f"{ratio:.2g} ({measure} {error:.3g} vs the adapter's effect {effect:.3g})"
        if o.requantized:
            measured += f"; about {max(0.0, 1 - ratio):.0%} of the adapter's effect survives requantization"
    checks = [Check("outputs", "merge error / adapter effect", passed, measured, f"≤ {t.max_error_ratio:g} (no-op: 1)")]
    lossy = "reported (requantized)" if o.requantized else None  # lossy by design: not required
    if o.logits and s.top1 is not None:
        checks.append(
            Check("outputs", "top-1 agreement", None if lossy else s.top1 >= t.min_top1,
                  f"{s.top1:.1%} of {s.positions} positions", lossy or f"≥ {t.min_top1:.0%}")
        )  # fmt: skip
    if o.generation:
        bad = [i for i, g in enumerate(o.generation) if not g.all_identical and not g.tied]
        tied = sum(1 for g in o.generation if g.tied)
        n = o.generation[0].compared
        identical = sum(g.all_identical for g in o.generation)
        measured = f"{identical} of {len(o.generation)} prompts identical for {n} tokens"
        if tied:
            measured += f"; {tied} diverge at a numerical tie"
        detail = ", ".join(f"prompt {i + 1} differs at new token {o.generation[i].identical + 1}" for i in bad)
        checks.append(Check("outputs", "greedy generation", None if lossy else not bad, measured,
                            lossy or f"{n} identical new tokens", detail))  # fmt: skip
    absolute = f"max |Δ| {s.max_abs:.3g}, mean |Δ| {s.mean_abs:.3g}"
    if o.logits and s.mean_kl is not None and s.max_kl is not None:
        absolute += f"; mean KL {s.mean_kl:.3g}, max KL {s.max_kl:.3g}"
    checks.append(Check("outputs", "absolute differences", None, absolute, "reported"))
    return checks
