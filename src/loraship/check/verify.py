"""``loraship verify``: prove that a merged folder behaves like base + adapter.

Two levels. **Weights** (streaming, any model size): every tensor the adapter changes is computed
again from base + adapter and compared bit for bit with the merged file; every other tensor must
be byte-identical to the base's; names, shapes and dtypes must match; no NaN/Inf; and a tensor
the adapter changes must differ from the base (a merge that changed nothing is the most common
silent failure). **Outputs**: base + adapter run through PEFT unmerged against the merged folder
loaded with plain transformers (:mod:`loraship.check.outputs`).
"""

from __future__ import annotations

import contextlib
import json
import math
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from loraship import __version__
from loraship.check.outputs import (
    OutputReport,
    Prompt,
    Thresholds,
    check_outputs,
    model_class,
    offload_check_supported,
)
from loraship.engine import quantized
from loraship.engine.conversions import PerExpertLora, per_expert_loras
from loraship.engine.merge import PreparedMerge, prepare_merge
from loraship.engine.oracle import OracleReport
from loraship.engine.plan import LoraStep, TensorPlan
from loraship.engine.safetensors_io import (
    CODE_NAMES,
    FLOAT_CODES,
    Checkpoint,
    TensorInfo,
    TensorReader,
    read_checkpoint,
    weight_files,
)
from loraship.errors import InputError, LorashipError, VerificationFailed, first_line

if TYPE_CHECKING:
    from loraship.engine.stream import TensorStreamer

_COMPARE_CHUNK = 16 << 20


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
class WeightReport:
    """What the weight-level comparison found."""

    tensors: int
    changed: int
    untouched: int
    exact: int
    close: int
    max_abs_diff: float
    mismatched: tuple[tuple[str, float], ...]
    untouched_mismatched: tuple[str, ...]
    missing: tuple[str, ...]
    extra: tuple[str, ...]
    wrong_layout: tuple[str, ...]
    change_missing: tuple[str, ...]
    same_as_base: int
    non_finite: tuple[str, ...]
    adapter_tensors: int
    adapter_applied: int
    adapter_ignored: int
    dtype: str | None


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


# --------------------------------------------------------------------------- weights


def load_merged(folder: Path) -> Checkpoint:
    """The merged folder's weight headers.

    Raises:
        InputError: The folder is missing or incomplete.
        CorruptFileError: A weight file is truncated or malformed.
    """
    if not folder.is_dir():
        raise InputError(
            f"The merged folder `{folder}` does not exist.",
            fix="Pass --merged the folder `loraship merge --output` wrote.",
        )
    if not (folder / "config.json").is_file():
        raise InputError(
            f"The merged folder `{folder}` is incomplete: it has no config.json.",
            fix="Merge again (`loraship merge ... --overwrite`) or download the complete folder.",
        )
    try:
        files = weight_files(folder)
    except LorashipError as e:
        raise InputError(
            f"The merged folder `{folder}` is incomplete: {e.message}",
            fix="Merge again (`loraship merge ... --overwrite`) or download the complete folder.",
        ) from e
    if files is None:
        raise InputError(
            f"The merged folder `{folder}` is incomplete: it has no model.safetensors and no "
            "model.safetensors.index.json.",
            fix="Merge again (`loraship merge ... --overwrite`) or download the complete folder.",
        )
    return read_checkpoint(folder, files)


def merged_dtype(prepared: PreparedMerge, merged: Checkpoint) -> str | None:
    """The ``--dtype`` the merged folder was written with, if not the base's own dtypes."""
    found = {
        (t.source.dtype, merged.tensors[t.name].dtype)
        for t in prepared.plan.tensors
        if t.source is not None and t.source.dtype in FLOAT_CODES and t.name in merged.tensors
    }
    targets = {dst for src, dst in found if dst != src}
    if len(targets) == 1 and all(dst in targets for _, dst in found):
        return CODE_NAMES.get(targets.pop())
    return None


def verify_weights(
    prepared: PreparedMerge,
    merged: Checkpoint,
    *,
    atol: float = 0.0,
    progress: bool = False,
    streamer: TensorStreamer | None = None,
) -> WeightReport:
    """Compare every merged tensor with its recomputation from base + adapter (streaming).

    ``progress``: a bar over the bytes checked, on stderr. ``streamer``: one kept across calls (a
    streaming run checks shard by shard; requantized scales follow their weight); a new one when None.
    """
    import torch
    from tqdm.auto import tqdm

    from loraship.engine.stream import TensorStreamer
    from loraship.engine.writer import DataChunk

    plan = prepared.plan
    planned = {t.name: t for t in plan.tensors}
    missing = tuple(n for n in planned if n not in merged.tensors)
    extra = tuple(n for n in merged.tensors if n not in planned)
    wrong_layout = tuple(
        f"{n} ({merged.tensors[n].dtype} {list(merged.tensors[n].shape)}, expected {t.dtype} {list(t.shape)})"
        for n, t in planned.items()
        if n in merged.tensors and _layout_differs(t, merged)
    )
    comparable = [t for t in plan.tensors if t.name in merged.tensors and not _layout_differs(t, merged)]
    exact = close = same_as_base = 0
    max_diff = 0.0
    mismatched: list[tuple[str, float]] = []
    untouched_bad: list[str] = []
    change_missing: list[str] = []
    non_finite: list[str] = []
    bar = tqdm(total=sum(merged.tensors[t.name].nbytes for t in comparable), unit="B", unit_scale=True,
               desc="Checking weights", disable=not progress, leave=False)  # fmt: skip
    with contextlib.ExitStack() as stack:
        stack.enter_context(bar)
        if streamer is None:
            streamer = stack.enter_context(TensorStreamer(stack.enter_context(TensorReader())))
        reader = streamer.reader
        for t in comparable:
            actual_info = merged.tensors[t.name]
            bar.update(actual_info.nbytes)
            if t.copies_bytes and t.source is not None:
                if not _same_bytes(reader, t.source, actual_info):
                    untouched_bad.append(t.name)
                continue
            offset = 0
            diff = 0.0
            equal = as_base = expected_is_base = True
            finite = True
            comparable_to_base = t.source is not None and t.source.shape == t.shape and t.source.dtype == t.dtype
            for work, _ in streamer.work(t):
                chunks = work.result() if not isinstance(work, list) else work
                for chunk in chunks:
                    assert isinstance(chunk, DataChunk)
                    expected = chunk.tensor.reshape(-1)
                    length = expected.numel() * expected.element_size()
                    actual = _read_flat(reader, actual_info, offset, length, expected.dtype)
                    if not torch.equal(_bits(actual), _bits(expected)):
                        equal = False
                        delta = (actual.double() - expected.double()).abs().nan_to_num(nan=math.inf)
                        diff = max(diff, float(delta.max()))
                    if actual.is_floating_point() and not bool(torch.isfinite(actual.float()).all()):
                        finite = False
                    if comparable_to_base and t.source is not None:
                        base_part = _read_flat(reader, t.source, offset, length, expected.dtype)
                        as_base &= bool(torch.equal(_bits(actual), _bits(base_part)))
                        expected_is_base &= bool(torch.equal(_bits(expected), _bits(base_part)))
                    if chunk.release is not None:
                        chunk.release()
                    offset += length
            max_diff = max(max_diff, diff)
            if equal:
                exact += 1
            elif diff <= atol:
                close += 1
            else:
                mismatched.append((t.name, diff))
            if not finite:
                non_finite.append(t.name)
            if comparable_to_base and as_base:
                same_as_base += 1
                if not expected_is_base:
                    change_missing.append(t.name)
    ignored = sum(1 for v in plan.accounting.values() if v.startswith("(ignored"))
    changed = [t for t in plan.tensors if not t.copies_bytes]
    return WeightReport(
        tensors=len(plan.tensors),
        changed=len(changed),
        untouched=len(plan.tensors) - len(changed),
        exact=exact,
        close=close,
        max_abs_diff=max_diff,
        mismatched=tuple(mismatched),
        untouched_mismatched=tuple(untouched_bad),
        missing=missing,
        extra=extra,
        wrong_layout=wrong_layout,
        change_missing=tuple(change_missing),
        same_as_base=same_as_base,
        non_finite=tuple(non_finite),
        adapter_tensors=len(plan.accounting),
        adapter_applied=len(plan.accounting) - ignored,
        adapter_ignored=ignored,
        dtype=None,
    )


def combine_weights(parts: Sequence[WeightReport], prepared: PreparedMerge) -> WeightReport:
    """The reports of a model checked shard by shard (each against its own tensors of the plan) as one."""
    plan = prepared.plan
    ignored = sum(1 for v in plan.accounting.values() if v.startswith("(ignored"))
    changed = sum(1 for t in plan.tensors if not t.copies_bytes)

    def joined(field_name: str) -> tuple[Any, ...]:
        return tuple(item for p in parts for item in getattr(p, field_name))

    return WeightReport(
        tensors=len(plan.tensors), changed=changed, untouched=len(plan.tensors) - changed,
        exact=sum(p.exact for p in parts), close=sum(p.close for p in parts),
        max_abs_diff=max((p.max_abs_diff for p in parts), default=0.0), mismatched=joined("mismatched"),
        untouched_mismatched=joined("untouched_mismatched"), missing=joined("missing"), extra=joined("extra"),
        wrong_layout=joined("wrong_layout"), change_missing=joined("change_missing"),
        same_as_base=sum(p.same_as_base for p in parts), non_finite=joined("non_finite"),
        adapter_tensors=len(plan.accounting), adapter_applied=len(plan.accounting) - ignored, adapter_ignored=ignored,
        dtype=None,
    )  # fmt: skip


def streamed_report(
    prepared: PreparedMerge,
    parts: Sequence[WeightReport],
    tensors: Mapping[str, TensorInfo],
    library: Sequence[str],
    files: int,
    labels: tuple[str, str, str],
    *,
    stopped: bool = False,
) -> VerifyReport:
    """The report of a streaming run: its shards' weight checks (each shard checked as it was
    written, before it was uploaded) with the checks that need no whole model; no output check.

    ``stopped``: the run stopped at the first shard that failed its check.
    """
    merged = Checkpoint(folder=Path("."), files=(), tensors=dict(tensors), metadata={})
    weights = replace(combine_weights(parts, prepared), dtype=merged_dtype(prepared, merged))
    checks = [*weight_checks(weights), library_result(library, files), names_check(prepared.names)]
    notes = list(prepared.plan.notes)
    notes.append(
        "Each merged shard was checked as it was written, before its upload: every tensor bit for bit against base + "
        "adapter; the outputs were not compared (`verify: {outputs: false}`)."
        if not stopped
        else f"The run stopped at the first shard that failed its check ({len(parts)} shard(s) checked); nothing was "
        "published."
    )
    return VerifyReport(*labels, checks=tuple(checks), weights=weights, outputs=None, notes=tuple(notes))


def _layout_differs(t: TensorPlan, merged: Checkpoint) -> bool:
    found = merged.tensors[t.name]
    return found.shape != t.shape or found.dtype != t.dtype


def _same_bytes(reader: TensorReader, a: TensorInfo, b: TensorInfo) -> bool:
    if a.nbytes != b.nbytes:
        return False
    for start in range(0, a.nbytes, _COMPARE_CHUNK):
        length = min(_COMPARE_CHUNK, a.nbytes - start)
        if reader.read_bytes(a, start, length) != reader.read_bytes(b, start, length):
            return False
    return True


def _read_flat(reader: TensorReader, info: TensorInfo, start: int, length: int, dtype: Any) -> Any:
    import torch

    data = reader.read_bytes(info, start, length)
    return torch.frombuffer(data, dtype=torch.uint8).view(dtype) if length else torch.empty(0, dtype=dtype)


def _bits(t: Any) -> Any:
    import torch

    size = t.element_size()
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[size]) if t.numel() else t


# --------------------------------------------------------------------------- checks


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


def library_problems(path: Path, tensors: Mapping[str, TensorInfo]) -> list[str]:
    """What the safetensors library reads differently from ``tensors`` in one file."""
    from safetensors import safe_open

    problems: list[str] = []
    try:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                shape = tuple(f.get_slice(name).get_shape())
                if name not in tensors or tensors[name].shape != shape:
                    problems.append(f"{path.name}: `{name}` reads as {list(shape)}")
    except Exception as e:  # the library's own error types differ by version
        problems.append(f"{path.name}: {first_line(e)}")
    return problems


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


# --------------------------------------------------------------------------- orchestration


def verify(
    base: Path,
    adapter: Path,
    merged: Path,
    *,
    outputs: bool = True,
    prompts: Sequence[Prompt] | None = None,
    device: str = "auto",
    dtype: str = "auto",
    thresholds: Thresholds | None = None,
    threshold_overrides: Mapping[str, float | int] | None = None,
    weight_atol: float = 0.0,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    labels: tuple[str, str, str] | None = None,
    progress: bool = False,
    max_memory: int | None = None,
) -> VerifyReport:
    """Verify a merged folder against base + adapter; see the module docstring.

    Args:
        labels: How to name base, adapter and merged in the report (e.g. ``repo@sha``); paths when None.
        max_memory: Bytes the output check's models may take in memory (disk offload past that).
        progress: Show progress on stderr: a bar over the weights checked, each model load, each prompt.

    Raises:
        LorashipError: The inputs cannot be verified (missing or incomplete folders, corrupt files, an
            adapter that does not fit the base): exit code 2 on the command line.
    """
    merged_ckpt = load_merged(merged)
    if outputs:  # fail fast, before the weight pass, if the outputs cannot be compared at all
        model_class(json.loads((merged / "config.json").read_text()), merged, trust_remote_code=trust_remote_code)
        if max_memory is not None:
            offload_check_supported(adapter)
    with tempfile.TemporaryDirectory(prefix="loraship-scratch-") as scratch:
        prepared = prepare_merge(
            base, adapter, allow_pickle=allow_pickle, scratch=Path(scratch), refuse_disagreement=False
        )
        out_dtype = merged_dtype(prepared, merged_ckpt)
        if out_dtype:
            prepared = prepared.with_dtype(out_dtype)
        requantized = quantized.requantized_output(prepared.plan, merged_ckpt)
        if requantized:
            prepared = prepared.requantized()
        weights = verify_weights(prepared, merged_ckpt, atol=weight_atol, progress=progress)
        weights = replace(weights, dtype=out_dtype)
    checks = [*weight_checks(weights), library_check(merged_ckpt), names_check(prepared.names)]
    output_report = None
    notes: list[str] = list(prepared.plan.notes)
    if outputs:
        output_report = check_outputs(
            base, adapter, merged, prompts=prompts, device=device, dtype=dtype, thresholds=thresholds,
            overrides=threshold_overrides, trust_remote_code=trust_remote_code, per_expert=_per_expert(prepared),
            progress=progress, requantized=requantized, max_memory=max_memory,
        )  # fmt: skip
        checks += output_checks(output_report)
        notes.extend(output_report.notes)
        if requantized:
            notes.append(
                "The merged weights are requantized to the base's FP8 (--requantize): each changed weight was checked "
                "bit for bit against dequantize → merge → quantize (as transformers' Fp8Quantize); the outputs are "
                "compared with base + adapter unquantized, to measure how much of the adapter's effect survives "
                "(top-1 agreement and greedy generation are reported, not required)."
            )
        if output_report.reference_problem is not None:
            notes.append(
                "PEFT's unmerged model is not base + adapter here (it converts this transformers-v4 adapter wrongly), "
                "so the outputs were not compared; the weights were checked bit for bit against the adapter's own math "
                "(each expert's W + scale·B·A)."
            )
    names = labels or (str(base), str(adapter), str(merged))
    return VerifyReport(*names, checks=tuple(checks), weights=weights, outputs=output_report, notes=tuple(notes))


def _per_expert(prepared: PreparedMerge) -> list[PerExpertLora]:
    """LoRAs the adapter saved on per-expert tensors (transformers v4 names), placed in their fused parameters."""
    m = prepared.model
    if m is None or not m.fused:
        return []
    sources = m.fused_sources
    loras = {t.name: s.module for t in prepared.plan.tensors if t.name in sources
             for s in t.steps if isinstance(s, LoraStep) and s.part is None}  # fmt: skip
    if not loras:
        return []
    return per_expert_loras(m.fused, {n: i.shape for n, i in prepared.base.tensors.items()}, loras)


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
