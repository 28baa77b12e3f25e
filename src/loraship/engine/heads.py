"""An adapter that brings a head the base lacks (a classifier trained on a pretraining checkpoint):
what config.json must say for transformers to build the merged model with that head."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from loraship.engine.plan import TensorPlan

_TASK_HEADS = {
    "SEQ_CLS": "ForSequenceClassification",
    "TOKEN_CLS": "ForTokenClassification",
    "QUESTION_ANS": "ForQuestionAnswering",
}


def head_config(
    config: Mapping[str, Any], adapter_config: Mapping[str, Any], trained: str | None, tensors: Sequence[TensorPlan]
) -> tuple[dict[str, Any], str | None]:
    """config.json changes naming the head's class and labels, and a note for the plan.

    Args:
        trained: The model class the adapter was trained on, when known.
        tensors: The planned output; tensors without a source are the new head's.
    """
    updates: dict[str, Any] = {}
    note = None
    archs = list(config.get("architectures") or [])
    task = str(adapter_config.get("task_type") or "")
    trained = trained or head_class(archs, task)
    new = ", ".join(t.name for t in tensors if t.source is None)
    if trained and archs != [trained]:
        updates["architectures"] = [trained]
        note = f"The adapter adds a head the base lacks ({new}): architectures becomes {trained}."
    if task in ("SEQ_CLS", "TOKEN_CLS"):
        heads = [t for t in tensors if t.source is None and t.name.endswith(".weight") and len(t.shape) == 2]
        if heads:
            labels = heads[-1].shape[0]
            id2label = config.get("id2label")
            if not isinstance(id2label, dict) or len(id2label) != labels:
                updates["id2label"] = {str(i): f"LABEL_{i}" for i in range(labels)}
                updates["label2id"] = {f"LABEL_{i}": i for i in range(labels)}
    return updates, note


def head_class(architectures: list[str], task: str) -> str | None:
    """``LlamaForCausalLM`` + ``SEQ_CLS`` -> ``LlamaForSequenceClassification``."""
    suffix = _TASK_HEADS.get(task)
    if not suffix or not architectures:
        return None
    arch = str(architectures[0])
    for marker in ("For", "LMHeadModel", "Model"):
        if marker in arch:
            return arch[: arch.index(marker)] + suffix
    return None
