"""Card stage: gather what the model card says and write README.md into the staged folder.

:func:`write_card` takes the run's context, the base and adapter, the staging folder and the check
stage's :class:`~loraship.run.verify.Checked` (the merge's result and the verification report);
the card itself is rendered by :mod:`loraship.run.card`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from loraship.engine.adapter import CONFIG_NAME as ADAPTER_CONFIG
from loraship.engine.plan import MergePlan
from loraship.engine.repo_files import CARD_NAME, CONFIG_NAME, TOKENIZER_FILES, is_host_path
from loraship.engine.safetensors_io import CODE_NAMES
from loraship.run.context import Input, RunContext
from loraship.run.job import MergeJob, parse_source
from loraship.run.verify import Checked


def write_card(ctx: RunContext, base: Input, adapter: Input, staging: Path, checked: Checked) -> None:
    ctx.log("Writing the model card ...")
    (staging / CARD_NAME).write_text(card_text(ctx, base, adapter, staging, checked))


def card_text(ctx: RunContext, base: Input, adapter: Input, staging: Path, checked: Checked) -> str:
    from loraship.run.card import CardInputs, render_card

    result, report = checked.result, checked.report
    spec = result.prepared.adapter
    adapter_card = adapter.folder / CARD_NAME
    config = json.loads((staging / "config.json").read_text())
    dtypes = sorted({CODE_NAMES.get(t.dtype, t.dtype) for t in result.prepared.plan.tensors})
    inputs = CardInputs(
        repo_id=ctx.output_label,
        base=base.name, adapter=adapter.name, base_sha=base.state.sha if base.state else None,
        adapter_sha=adapter.state.sha if adapter.state else None, base_is_hub=base.state is not None,
        base_repo=base_repo(base, adapter),
        adapter_is_hub=adapter.state is not None,
        base_card=base.state.card_data if base.state else _card_metadata(base.folder / CARD_NAME),
        adapter_card=adapter.state.card_data if adapter.state else _card_metadata(adapter_card),
        adapter_text=adapter_card.read_text() if adapter_card.is_file() else "", spec=spec, config=config,
        dtype=", ".join(dtypes) + _requantized(result.prepared.plan, result.prepared.base_config),
        job_yaml=job_yaml(ctx.job), job_hash=ctx.job.job_hash(),
        verification=report.to_markdown() if report else None, tags=ctx.job.card.tags,
        language=ctx.job.card.language, extra=ctx.job.card.extra, notes=result.prepared.notes,
        has_tokenizer=any((staging / name).is_file() for name in TOKENIZER_FILES),
        endpoint=ctx.hub.endpoint if ctx.hub else "https://huggingface.co",
    )  # fmt: skip
    return render_card(inputs)


def base_repo(base: Input, adapter: Input) -> str | None:
    """The Hub repo a local base is a copy of: the adapter's ``base_model_name_or_path``, else the base
    config's ``_name_or_path``, when it is a repo id (a path of some machine is no ``base_model``)."""
    if base.state is not None:
        return None
    for path, key in (
        (adapter.folder / ADAPTER_CONFIG, "base_model_name_or_path"),
        (base.folder / CONFIG_NAME, "_name_or_path"),
    ):
        try:
            value = json.loads(path.read_text()).get(key)
        except (OSError, ValueError, AttributeError):
            continue
        if not isinstance(value, str) or not value or is_host_path(value):
            continue
        try:
            named = parse_source(value)
        except ValueError:
            continue
        if named.repo_id:
            return named.repo_id
    return None


def job_yaml(job: MergeJob) -> str:
    """The job as loraship.yaml would hold it, local folders and files named ``./<name>``: the card shows
    no path of this machine (the job hash does not depend on them)."""
    updates: dict[str, Any] = {}
    for key, text in (("adapter", job.adapter), ("base", job.base)):
        if text and parse_source(text).is_local:
            updates[key] = f"./{_name(text)}"
    if job.output_target.is_local:
        updates["output"] = f"dir:./{_name(str(job.output_target.path))}"
    if isinstance(job.verify.prompts, str):
        updates["verify"] = job.verify.model_copy(update={"prompts": f"./{_name(job.verify.prompts)}"})
    renamed = job.model_copy(update=updates)
    if renamed == job:
        return job.to_yaml()
    return "# local folders and files by their names: put them beside loraship.yaml\n" + renamed.to_yaml()


def _name(text: str) -> str:
    return Path(text).expanduser().resolve().name or "folder"


def _card_metadata(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    from huggingface_hub import ModelCard

    try:
        return dict(ModelCard.load(path).data.to_dict())
    except Exception:  # a malformed card is not a reason to fail the merge
        return {}


def _requantized(plan: MergePlan, config: Mapping[str, Any]) -> str:
    """What the card's Weights row adds for a ``--requantize`` merge."""
    if not any(t.requantize for t in plan.tensors):
        return ""
    from loraship.engine.quantized import describe

    return (
        f"; the weights the adapter changes were quantized again to the base's {describe(config)} by loraship "
        "(lossy: see Verification for how much of the adapter's effect survives)"
    )
