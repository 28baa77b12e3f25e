"""Base checkpoint + adapter -> :class:`~loraship.engine.plan.MergePlan`: what each output tensor becomes. Pure.

The plan is a list of output tensors, each with the base tensor it starts from and the steps
applied to it (replace by a trained copy, add a LoRA delta, DoRA, a LoRA bias, replace rows). It
is computed from tensor headers only, so ``loraship plan`` prints it without reading tensor data,
and the executor (:mod:`loraship.engine.merge`) only carries it out. Every adapter tensor must land in
the plan or be named as ignored with a reason: a merge never drops part of an adapter silently.

Planning runs in phases over one :class:`~loraship.engine.planning.state.PlanState`
(:mod:`loraship.engine.planning`): collect the adapter's steps, place them on output tensors,
check, build the plan.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from loraship.engine.adapter import AdapterSpec
from loraship.engine.model_map import ModelMap
from loraship.engine.plan import MergePlan
from loraship.engine.planning.build import build
from loraship.engine.planning.checks import check_tying_known, check_unmatched
from loraship.engine.planning.collect import collect
from loraship.engine.planning.names import NameResolver
from loraship.engine.planning.place import note_per_expert, place
from loraship.engine.planning.state import PlanState, vocab_size
from loraship.engine.quantized import check_base
from loraship.engine.safetensors_io import Checkpoint

__all__ = ["NameResolver", "plan_merge", "vocab_size"]


def plan_merge(
    base: Checkpoint,
    base_config: Mapping[str, Any],
    adapter: AdapterSpec,
    *,
    model: ModelMap | None = None,
    dtype: str | None = None,
    base_label: str = "base",
) -> MergePlan:
    """Decide every output tensor of merging ``adapter`` into ``base``. Reads no tensor data.

    Args:
        base: The base checkpoint's tensor headers.
        base_config: The base's config.json.
        adapter: The adapter.
        model: Names and tying as transformers has them (:func:`loraship.engine.model_map.inspect_model`);
            without it names are matched by a wrapper prefix at most, and tied embeddings are refused.
        dtype: Output dtype name (``bfloat16``, ``float16``, ``float32``); None keeps each tensor's.
        base_label: How to name the base in messages.

    Raises:
        IncompatibleError: An adapter tensor matches no base tensor, or shapes disagree.
        UnsupportedError: A layer kind loraship cannot merge.
        BaseModelError: The base is quantized.
    """
    check_base(base_config, where=base_label)
    state = PlanState(base, base_config, adapter, model, base_label)
    collect(state)
    place(state)
    note_per_expert(state)
    check_unmatched(state)
    check_tying_known(state)
    return build(state, dtype)
