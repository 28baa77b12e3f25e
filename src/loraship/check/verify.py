"""``loraship verify``: prove that a merged folder behaves like base + adapter.

Two levels. **Weights** (streaming, any model size): every tensor the adapter changes is computed
again from base + adapter and compared bit for bit with the merged file; every other tensor must
be byte-identical to the base's; names, shapes and dtypes must match; no NaN/Inf; and a tensor
the adapter changes must differ from the base (a merge that changed nothing is the most common
silent failure). **Outputs**: base + adapter run through PEFT unmerged against the merged folder
loaded with plain transformers (:mod:`loraship.check.outputs`).

This module runs both and assembles the report; the weight check itself is
:mod:`loraship.check.weights`, the table's rows :mod:`loraship.check.verdicts`, the report and its
renderings :mod:`loraship.check.report` (all re-exported here).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

from loraship.check.outputs import (
    Prompt,
    Thresholds,
    check_outputs,
    model_class,
    offload_check_supported,
)
from loraship.check.report import (
    Check,
    VerifyReport,
    raise_if_failed,
    render_markdown,
    render_text,
    write_report,
)
from loraship.check.verdicts import (
    error_ratio,
    library_check,
    library_result,
    names_check,
    output_checks,
    weight_checks,
)
from loraship.check.weights import (
    WeightReport,
    combine_weights,
    library_problems,
    load_merged,
    merged_dtype,
    verify_weights,
)
from loraship.engine import quantized
from loraship.engine.conversions import PerExpertLora, per_expert_loras
from loraship.engine.merge import PreparedMerge, prepare_merge
from loraship.engine.plan import LoraStep
from loraship.engine.safetensors_io import Checkpoint, TensorInfo

__all__ = [
    "Check",
    "VerifyReport",
    "WeightReport",
    "combine_weights",
    "error_ratio",
    "library_check",
    "library_problems",
    "library_result",
    "load_merged",
    "merged_dtype",
    "names_check",
    "output_checks",
    "raise_if_failed",
    "render_markdown",
    "render_text",
    "streamed_report",
    "verify",
    "verify_weights",
    "weight_checks",
    "write_report",
]


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
                "PEFT's unmerged model is not base + adapter here (it loads this adapter wrongly), "
                "so the outputs were not compared; the weights were checked bit for bit against the adapter's own math "
                "(W + scale·B·A of each tensor it names)."
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
