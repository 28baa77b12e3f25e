"""What every PEFT method's tests check, written once: the merge bit-identical to PEFT's ``merge_and_unload()`` on
fp32, bf16 and fp16 bases; the merged folder, loaded with plain transformers, behaving as PEFT's unmerged model; and
``verify`` passing the merge and failing one applied twice.

A method's test file subclasses :class:`Case` with its PEFT type (and its own fields, or its own way of building
the adapter), lists its cases, and calls these checks from its parametrized tests. Imported as ``methods.harness``
(``tests`` is on pytest's pythonpath; a plain ``harness`` is tests/container's).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import torch
from conftest import (
    LLAMA,
    assert_changes_as_planned,
    assert_same_tensors,
    load_tensors,
    peft_outputs,
    peft_reference,
    plain_outputs,
)

from loraship.engine.merge import merge
from loraship.tiny import build_method_adapter

DTYPES = ["float32", "bfloat16", "float16"]
#: What ``verify`` fails when the adapter is merged into the merged model again.
DOUBLED = {"weights: changed tensors recomputed", "outputs: merge error / adapter effect"}


@dataclass(frozen=True)
class Case:
    """One adapter to merge: its settings (the method's config arguments) on a base of ``config``."""

    peft_type: ClassVar[str] = ""  # set by each method's subclass

    id: str
    settings: dict[str, Any]
    config: dict[str, Any] = field(default_factory=lambda: LLAMA)
    model_class: str = "AutoModelForCausalLM"
    adapter_dtype: str | None = None
    inputs: str = "tokens"

    def adapter(self, base: Path, folder: Path, **override: Any) -> Path:
        """Save the case's adapter for ``base`` in ``folder`` (``override``: settings that replace the case's)."""
        settings = {**self.settings, **override}
        return build_method_adapter(
            base, folder, self.peft_type, model_class=self.model_class, adapter_dtype=self.adapter_dtype, **settings
        )


def inputs(kind: str = "tokens") -> dict[str, torch.Tensor]:
    """The inputs the outputs tests run: tokens, pixels for image models, samples for audio ones."""
    g = torch.Generator().manual_seed(0)
    if kind == "pixels":
        return {"pixel_values": torch.randn(1, 3, 16, 16, generator=g)}
    if kind == "audio":
        return {"input_values": torch.randn(1, 64, generator=g)}
    return {"input_ids": torch.randint(0, 30, (1, 9), generator=g)}


def untouched(plan: Any) -> frozenset[str]:
    """The tensors the plan leaves as they are (transformers may upcast them on load)."""
    return frozenset(t.name for t in plan.tensors if not t.changed)


class Merged(NamedTuple):
    base: Path
    adapter: Path
    result: Any  # the merge's result: ``result.prepared.plan`` and so on
    ours: dict[str, torch.Tensor]


def check_bit_identical(
    case: Case,
    dtype: str,
    model_cache: Callable[..., Path],
    tmp_path: Path,
    *,
    upcast_ok: Callable[[Any], frozenset[str]] | None = untouched,
    as_planned: bool = True,
) -> Merged:
    """Merge the case onto a ``dtype`` base: every tensor has PEFT's bits, and exactly the planned ones changed.

    ``upcast_ok``: from the plan, the tensors the reference may hold upcast (None: none may be).
    ``as_planned`` False: the caller checks what changed itself. Returns what it merged, for further checks.
    """
    base = model_cache(case.config, model_class=case.model_class, dtype=dtype)
    adapter = case.adapter(base, tmp_path / "adapter")
    result = merge(base, adapter, tmp_path / "merged", progress=False)
    reference = peft_reference(
        base, adapter, tmp_path / "peft", model_class=case.model_class, dtype=getattr(torch, dtype)
    )
    ours = load_tensors(tmp_path / "merged")
    if upcast_ok is None:
        assert_same_tensors(ours, reference)
    else:
        assert_same_tensors(ours, reference, upcast_ok=upcast_ok(result.prepared.plan))
    if as_planned:
        assert_changes_as_planned(result.prepared.plan, ours, base)
    return Merged(base, adapter, result, ours)


def check_behaves_like_peft(
    case: Case, model_cache: Callable[..., Path], tmp_path: Path, *, override: dict[str, Any] | None = None
) -> None:
    """The merged folder, loaded with plain transformers, gives PEFT's unmerged outputs (fp32, within 1e-4).

    ``override``: settings that replace the case's for this test.
    """
    base = model_cache(case.config, model_class=case.model_class, dtype="float32")
    adapter = case.adapter(base, tmp_path / "adapter", **(override or {}))
    merge(base, adapter, tmp_path / "merged", progress=False)
    x = inputs(case.inputs)
    expected = peft_outputs(base, adapter, x, model_class=case.model_class)
    actual = plain_outputs(tmp_path / "merged", x, model_class=case.model_class)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


def verify_merged_and_doubled(
    case: Case, model_cache: Callable[..., Path], tmp_path: Path, *, changed: int | None = None
) -> tuple[Any, Any]:
    """``verify`` passes the case's merge, every changed tensor recomputed exactly (``changed`` of them where
    given, else some); returns that report and ``verify``'s report on the adapter merged a second time."""
    from loraship.check.verify import verify

    base = model_cache(case.config, model_class=case.model_class)
    adapter = case.adapter(base, tmp_path / "adapter")
    merge(base, adapter, tmp_path / "merged", progress=False)
    report = verify(base, adapter, tmp_path / "merged", threshold_overrides={"generation_tokens": 4})
    assert report.passed, report.failed_checks
    if changed is None:
        assert report.weights.exact == report.weights.changed > 0
    else:
        assert report.weights.exact == report.weights.changed == changed
    merge(tmp_path / "merged", adapter, tmp_path / "twice", progress=False)
    twice = verify(base, adapter, tmp_path / "twice", threshold_overrides={"generation_tokens": 4})
    return report, twice


def failed_checks(report: Any) -> set[str]:
    """``level: name`` of each check the report failed."""
    return {f"{c.level}: {c.name}" for c in report.checks if c.passed is False}


def check_verify_catches_double_merge(
    case: Case, model_cache: Callable[..., Path], tmp_path: Path, *, changed: int | None = None
) -> None:
    """``verify`` passes a correct merge and fails the weights and the outputs of a doubled one."""
    _, twice = verify_merged_and_doubled(case, model_cache, tmp_path, changed=changed)
    assert failed_checks(twice) >= DOUBLED


def edit_config(adapter: Path, **changes: Any) -> None:
    """Set ``changes`` in the adapter's adapter_config.json (as a user editing it would)."""
    path = adapter / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
