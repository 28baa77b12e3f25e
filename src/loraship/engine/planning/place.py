"""Phase 2, place: steps on model parameters -> output tensors (single and tied targets). Pure.

Input: the :class:`~loraship.engine.planning.state.PlanState` after collect (``slots``, ``direct``).
Output, in it: ``targets`` (the steps each output tensor gets), ``accounting`` (adapter tensor ->
the tensor it lands in), ``unmatched`` (adapter tensors no base tensor takes) and, where untying by
config separates the changed embeddings, ``config_updates["tie_word_embeddings"] = False``. Names go
through :meth:`~loraship.engine.planning.state.PlanState.resolve` (transformers' view, else
:class:`~loraship.engine.planning.names.NameResolver`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from loraship.engine.plan import LoraStep, ReplaceStep, Step, TokenRowsStep
from loraship.engine.planning.state import Entry, PlanState, Target
from loraship.engine.safetensors_io import TensorInfo


def place(state: PlanState) -> None:
    for name, entries in state.direct.items():
        target = _target(state, name, state.base.tensors[name])
        for order, step, label, keys in entries:
            target.steps.append((order, step, label))
            for key in keys:
                state.accounting.setdefault(key, name)
    grouped: dict[tuple[str, ...], dict[str, list[Entry]]] = {}
    for param, entries in state.slots.items():
        group = state.model.group_of(param) if state.model is not None else (param,)
        if len(group) > 1:
            grouped.setdefault(group, {})[param] = entries
            continue
        _place_single(state, param, entries)
    both = state.adapter.ensure_weight_tying
    one_sided_first = sorted(  # a group that unties decides tie_word_embeddings for the others
        grouped.items(), key=lambda kv: all(_is_shared_step(e[1], both) for es in kv[1].values() for e in es)
    )
    for group, by_member in one_sided_first:
        _place_tied(state, group, by_member)
    if state.config_updates.get("tie_word_embeddings") is False and state.model is not None:
        for group in state.model.groups:  # untying by config splits groups the adapter does not touch too
            if group not in grouped:
                _place_tied(state, group, {})


def _target(state: PlanState, name: str, source: TensorInfo | None, note: str | None = None) -> Target:
    if name not in state.targets:
        state.targets[name] = Target(name, source, note=note)
    return state.targets[name]


def _place_single(state: PlanState, param: str, entries: list[Entry]) -> None:
    name = state.resolve(param)
    if name is None:
        if not all(isinstance(e[1], ReplaceStep) for e in entries) or not _may_be_new(state, param):
            state.unmatched.extend(k for e in entries for k in e[3])
            return
        new = state.model.saved_as.get(param, param) if state.model is not None else param
        target = _target(state, new, None, note="new tensor from the adapter")
    else:
        target = _target(state, name, state.base.tensors[name])
    for order, step, label, keys in entries:
        target.steps.append((order, step, label))
        for key in keys:
            state.accounting[key] = target.name


def _may_be_new(state: PlanState, param: str) -> bool:
    """A trained copy of a parameter the checkpoint lacks is a new head, if the model has it."""
    return state.model is None or param in state.model.saved_as


def _place_tied(state: PlanState, group: tuple[str, ...], by_member: Mapping[str, list[Entry]]) -> None:
    """Steps on parameters that share one tensor: shared steps apply to all; one-sided ones untie.

    The reference is PEFT's *unmerged* model: a LoRA or a modules_to_save copy changes one module
    only (unless the adapter was trained with ``ensure_weight_tying``), so the merged model must
    store that module's weight on its own; merging it into the shared tensor (as PEFT's
    ``merge_and_unload`` does) would change the other modules too.
    """
    assert state.model is not None
    m = state.model
    stored = {p: m.stored[p] for p in group if p in m.stored}
    keys = [k for entries in by_member.values() for e in entries for k in e[3]]
    if not stored:
        state.unmatched.extend(keys)
        return
    source = state.base.tensors[next(iter(stored.values()))]
    both = state.adapter.ensure_weight_tying
    shared: list[Entry] = []
    own: dict[str, list[Entry]] = {}
    for param in group:  # the group's order: the input embedding's copy of a shared change wins
        for entry in by_member.get(param, []):
            if not _is_shared_step(entry[1], both):
                own.setdefault(param, []).append(entry)
            elif any(type(s[1]) is type(entry[1]) for s in shared):
                if isinstance(entry[1], LoraStep):
                    state.note_once(
                        "The adapter ties the output embedding's LoRA to the input embedding's "
                        "(ensure_weight_tying): the delta is applied once, to the shared weight."
                    )
                _account(state, entry[3], None)  # the same shared change saved twice: applied once
            else:
                shared.append(entry)
    direct = {p for p in group if m.saved_as.get(p) == stored.get(p)}
    if not own and state.config_updates.get("tie_word_embeddings") is not False:
        first = None
        for name in dict.fromkeys(stored.values()):  # every stored copy of the group stays identical
            target = _target(state, name, state.base.tensors[name])
            target.steps.extend(e[:3] for e in shared)
            first = first or target.name
        for entry in shared:
            _account(state, entry[3], first)
        return
    parts: list[tuple[str, ...]] = []
    if m.untie_by_config:  # tie_word_embeddings=false, if it separates every changed parameter
        parts = [tuple(p for p in g if p in group) for g in m.untied_groups if set(g) & set(group)]
        parts += [(p,) for p in group if not any(p in part for part in parts)]
        if any(len(part) > 1 and set(part) & set(own) for part in parts):
            parts = []
    by_config = bool(parts)
    if by_config:
        state.config_updates["tie_word_embeddings"] = False
    else:  # transformers loads tied tensors that are stored with different values untied
        rest = tuple(p for p in group if p not in own)
        parts = [(p,) for p in group if p in own] + ([rest] if rest else [])
    for part in parts:
        changed = [p for p in part if p in own]
        stored_here = [m.saved_as[p] for p in part if p in direct]
        name = stored_here[0] if stored_here else m.saved_as.get(changed[0] if changed else part[0], part[0])
        note = None if name == source.name else f"untied from {source.name}"
        target = _target(state, name, source, note=note)
        entries = shared + (own[changed[0]] if changed else [])
        target.steps.extend(e[:3] for e in entries)
        for entry in entries:  # a shared change is accounted to the tensor that stored the group
            if entry not in shared or name == source.name or not set(entry[3]) & set(state.accounting):
                _account(state, entry[3], target.name)
    if own:
        names = ", ".join(f"`{m.saved_as.get(p, p)}`" for p in own)
        how = (
            "sets tie_word_embeddings=false"
            if by_config
            else f"keeps tie_word_embeddings ({m.model_class} ties them whatever it says, or reads more "
            "from it); transformers loads tied tensors stored with different values untied"
        )
        state.note_once(
            f"Untied the embeddings: `{source.name}` is shared by {len(group)} parameters, and the adapter "
            f"changes {names} on its own, so the merged model stores them separately and {how} (as base + "
            "adapter behaves; merging into the shared weight would change the others too)."
        )


def _account(state: PlanState, keys: Iterable[str], target: str | None) -> None:
    for key in keys:
        if target is not None:
            state.accounting[key] = target
        else:
            state.accounting.setdefault(key, "(ignored: the same shared change, saved under both tied names)")


#: Steps on a tied parameter that PEFT's unmerged model applies to every module sharing it: a saved
#: base layer is loaded into the shared parameter, trainable tokens wrap the tied layers too.
def _is_shared_step(step: Step, ensure_weight_tying: bool) -> bool:
    if isinstance(step, ReplaceStep) and step.origin == "saved_base_layer":
        return True
    return isinstance(step, TokenRowsStep) or ensure_weight_tying


def note_per_expert(state: PlanState) -> None:
    """Once placed: a note on the per-expert tensors an adapter saved under transformers v4 names."""
    if state.per_expert:
        n = len(dict.fromkeys(state.per_expert))
        state.note_once(
            f"The adapter was saved under transformers v4 names (one LoRA per expert layer, {n} expert tensors "
            f"such as `{state.per_expert[0]}`): each is merged into the per-expert tensor it names, by the "
            "adapter's own math (W + scale·B·A). PEFT converts such adapters when it loads them into "
            "transformers v5 models, and gets some conversions wrong; `loraship verify` says when its "
            "reference does."
        )
