"""The verification report: each check's row, the measurements behind them, and how they are shown
(text for the terminal, Markdown for cards and step summaries, JSON for scripts)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from loraship import __version__
from loraship.check.outputs import (
    OutputReport,
)
from loraship.check.weights import WeightReport
from loraship.errors import VerificationFailed


@dataclass(frozen=True)
class Check:
    """One verification check.

    Attributes:
        level: ``weights`` or ``outputs``.
        name: What is checked.
        passed: True, False, or None when the check is informative only or skipped.
        measured: What was measured, for people.
        required: What it must be.
        detail: The first offenders (tensor names, prompts), when it failed.
    """

    level: Literal["weights", "outputs"]
    name: str
    passed: bool | None
    measured: str
    required: str
    detail: str = ""


@dataclass(frozen=True)
class VerifyReport:
    """The whole verification: identities, every check, the measurements behind them."""

    base: str
    adapter: str
    merged: str
    checks: tuple[Check, ...]
    weights: WeightReport
    outputs: OutputReport | None
    loraship_version: str = __version__
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def passed(self) -> bool:
        return all(c.passed is not False for c in self.checks)

    @property
    def failed_checks(self) -> list[str]:
        return [f"{c.level}: {c.name}" for c in self.checks if c.passed is False]

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["passed"] = self.passed
        data["failed_checks"] = self.failed_checks
        return data

    def to_markdown(self) -> str:
        return render_markdown(self)


def render_markdown(report: VerifyReport) -> str:
    """The report as a Markdown table, for step summaries and model cards."""
    verdict = "passed" if report.passed else "FAILED"
    lines = [
        f"### loraship verification: {verdict}",
        "",
        "| level | check | result | measured | required |",
        "|---|---|---|---|---|",
    ]
    for c in report.checks:
        result = "✅ pass" if c.passed else ("❌ FAIL" if c.passed is False else "ℹ️ info")
        measured = c.measured + (f" — {c.detail}" if c.detail and c.passed is False else "")
        lines.append(f"| {c.level} | {_md(c.name)} | {result} | {_md(measured)} | {_md(c.required)} |")
    lines.append("")
    o = report.outputs
    if o is not None:
        lines.append(
            f"Reference: base + adapter through PEFT, unmerged. Merged: loaded with transformers "
            f"`{o.model_class}`. Run in {o.dtype} on {o.device}, on {o.inputs} ({o.prompts} inputs)."
        )
    else:
        lines.append("Outputs were not compared (weights only).")
    lines.append(f"Base: `{report.base}`; adapter: `{report.adapter}`; merged: `{report.merged}`.")
    return "\n".join(lines) + "\n"


def render_text(report: VerifyReport) -> str:
    """The report as a plain-text table for the terminal."""
    from loraship.text import table

    rows = [
        (c.level, c.name, "pass" if c.passed else ("FAIL" if c.passed is False else "info"), c.measured, c.required)
        for c in report.checks
    ]
    out = [table(("level", "check", "result", "measured", "required"), rows, wrap=(1, 3, 4))]
    for c in report.checks:
        if c.passed is False and c.detail:
            out.append(f"{c.name}: {c.detail}")
    o = report.outputs
    if o is not None:
        out.append(f"Outputs: PEFT unmerged vs {o.model_class}, {o.dtype} on {o.device}, {o.inputs}.")
    out.extend(f"Note: {n}" for n in report.notes)
    out.append("Verification passed." if report.passed else "Verification FAILED: " + "; ".join(report.failed_checks))
    return "\n".join(out)


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def write_report(report: VerifyReport, *, json_path: Path | None, markdown_path: Path | None) -> None:
    if json_path is not None:
        json_path.write_text(json.dumps(report.to_json(), indent=2, default=str) + "\n")
    if markdown_path is not None:
        markdown_path.write_text(report.to_markdown())


def raise_if_failed(report: VerifyReport) -> None:
    """Raise :class:`VerificationFailed`, carrying the report, unless every check passed."""
    if not report.passed:
        if report.weights.adapter_non_finite:
            names = report.weights.adapter_non_finite
            more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
            error = VerificationFailed(
                f"The adapter holds non-finite values (NaN or Inf) in `{names[0]}`{more}, so the merged model does "
                "too: the adapter itself is broken, not the merge.",
                fix="Retrain the adapter (its training diverged: check the loss for NaN, lower the learning rate) or "
                "export it again from a good checkpoint; merging this adapter again gives the same result.",
            )
            error.report = report
            raise error
        weights_exact = all(c.passed is not False for c in report.checks if c.level == "weights")
        half = report.outputs is not None and report.outputs.dtype in ("bfloat16", "float16")
        if weights_exact and report.outputs is not None and report.outputs.requantized:
            error = VerificationFailed(
                "The merged weights are requantized exactly as planned, but FP8 rounds away too much of this "
                "adapter's effect: " + "; ".join(report.failed_checks) + ".",
                fix="Publish in 16 bits: drop --requantize (in loraship.yaml `requantize: false`); or accept the loss "
                "with a higher `--max-error-ratio` (in loraship.yaml `verify: {max_error_ratio: ...}`).",
            )
            error.report = report
            raise error
        if weights_exact and half:  # the merge is exact: the outputs differ by half-precision rounding
            assert report.outputs is not None
            dtype = report.outputs.dtype
            error = VerificationFailed(
                f"The merged weights are exact (every changed tensor bit-identical to base + adapter), but the "
                f"output check in {dtype} failed: " + "; ".join(report.failed_checks) + f". The difference is "
                f"{dtype} rounding in the check (the larger the adapter's effect, the larger it is), not a wrong "
                "merge.",
                fix="Run the output check in float32 (`--dtype float32`; in loraship.yaml `verify: {dtype: float32}`), "
                "or relax its thresholds for this adapter (`--max-error-ratio`, `--min-top1`).",
            )
            error.report = report
            raise error
        error = VerificationFailed(
            "The merged model does not match base + adapter: " + "; ".join(report.failed_checks) + ".",
            fix="Do not publish it. Merge again with `loraship merge` (and check that the adapter and base are "
            "the ones it was trained with); the report says which tensors or outputs differ.",
        )
        error.report = report
        raise error
