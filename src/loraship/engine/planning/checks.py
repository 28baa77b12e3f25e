"""Phase 3, checks: refusals between placing and building, and while building. Pure.

Input: the :class:`~loraship.engine.planning.state.PlanState` (and, for the vocabulary, the built
tensor plans). Output: nothing, or an error: adapter tensors that match no base tensor, a change
to a possibly tied embedding when transformers' view of the model is unknown, a LoRA on a tensor
that is not floating-point, a vocabulary resized on one embedding only (a consistent resize adds
``vocab_size`` to the config updates and a note), and an adapter tensor the plan lost.
"""

from __future__ import annotations

from typing import Any

from loraship.engine import quantized
from loraship.engine.plan import TensorPlan
from loraship.engine.planning.state import PlanState, Target, vocab_size
from loraship.engine.safetensors_io import FLOAT_CODES, TensorInfo
from loraship.errors import BaseModelError, IncompatibleError, UnsupportedError


def check_unmatched(state: PlanState) -> None:
    if not state.unmatched:
        return
    a = state.adapter
    modules = {m.module for m in a.lora_modules} | {r.module for r in a.replacements}
    matched = {k for k, v in state.accounting.items() if not v.startswith("(ignored")}
    if not matched:
        trained = state.model.model_class if state.model is not None else a.base_model_class
        archs = state.config.get("architectures") or [state.model_type or "unknown"]
        detail = f" (the adapter was trained on `{trained}`; the base is `{archs[0]}`)" if trained else ""
        raise IncompatibleError(
            f"None of the {len(modules)} modules the adapter changes exist in the base model "
            f"`{state.base_label}`: the adapter was made for another architecture{detail}.",
            fix="Use the base model the adapter was trained on" + state.trained_on() + ".",
        )
    shown = ", ".join(f"`{k}`" for k in state.unmatched[:20])
    more = f" and {len(state.unmatched) - 20} more" if len(state.unmatched) > 20 else ""
    raise IncompatibleError(
        f"{len(state.unmatched)} adapter tensor(s) match no tensor of the base model `{state.base_label}`: "
        f"{shown}{more}.",
        fix="Use the base model the adapter was trained on"
        + state.trained_on()
        + "; merging without these tensors would silently drop part of the adapter.",
    )


def check_tying_known(state: PlanState) -> None:
    """Without transformers' view of the model, a change to a possibly tied embedding is refused."""
    if state.model is not None or not state.config.get("tie_word_embeddings", True):
        return
    touched = [
        t.name for t in state.targets.values()
        if t.source is not None and len(t.source.shape) == 2 and t.source.shape[0] == vocab_size(state.config)
    ]  # fmt: skip
    if touched:
        raise UnsupportedError(
            f"The adapter changes {', '.join(f'`{n}`' for n in touched)}, which may be tied to the other "
            "embedding, and transformers cannot build this model class to tell.",
            fix="Install the transformers version that has this model class (or pass --trust-remote-code "
            "where supported), or merge with PEFT and check the result with `loraship verify`.",
        )


def check_float(state: PlanState, target: Target, source: TensorInfo | None) -> None:
    packed = isinstance(source, quantized.PackedTensor)
    if source is not None and source.dtype not in FLOAT_CODES and source.name not in state.scales and not packed:
        raise BaseModelError(
            f"`{target.name}` in the base model `{state.base_label}` is stored as {source.dtype}, not as a "
            "floating-point tensor: it is quantized, and a LoRA delta cannot be merged into it.",
            fix="Merge into the full-precision model this one was quantized from: pass it with --base "
            "(in loraship.yaml: `base:`).",
        )


def check_vocab(state: PlanState, tensors: list[TensorPlan], updates: dict[str, Any]) -> None:
    """A resized vocabulary must resize every embedding the merged model stores."""
    old = vocab_size(state.config)
    embeddings = [t for t in tensors if state.is_embedding(state.targets.get(t.name) or Target(t.name, t.source),
                                                            t.source.shape if t.source else t.shape)]  # fmt: skip
    resized = {t.name: t.shape[0] for t in embeddings if t.source is not None and t.shape[0] != t.source.shape[0]}
    if not resized:
        return
    sizes = set(resized.values())
    behind = sorted(t.name for t in embeddings if t.name not in resized and t.shape[0] == old)
    if len(sizes) > 1 or behind:
        desc = ", ".join(f"`{n}` to {v} rows" for n, v in resized.items())
        left = f"; {', '.join(f'`{n}`' for n in behind)} stays at {old} rows" if behind else ""
        raise IncompatibleError(
            f"The adapter resizes the vocabulary inconsistently: it saves {desc}{left}.",
            fix="Save the adapter with both embeddings (modules_to_save=['embed_tokens', 'lm_head'] or "
            "save_embedding_layers=True) after resize_token_embeddings().",
        )
    (size,) = sizes
    updates["vocab_size"] = size
    state.notes.append(f"The adapter resizes the vocabulary from {old} to {size} tokens: config.json follows.")


def check_accounting(state: PlanState) -> None:
    missing = [k for k in state.adapter.tensors if k not in state.accounting]
    if missing:  # pragma: no cover - every parsed tensor is collected above
        raise AssertionError(f"adapter tensors not planned: {missing}")
