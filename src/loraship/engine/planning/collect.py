"""Phase 1, collect: the adapter's tensors -> steps per model parameter or stored tensor. Pure.

Input: a fresh :class:`~loraship.engine.planning.state.PlanState`. Output, in it: ``slots`` (steps
per model parameter: trained copies, LoRAs, LoRA biases, other methods' modules, trainable tokens),
``direct`` (a LoRA on a fused MoE expert parameter, one step per per-expert tensor the checkpoint
stores) and the ignored tensors' ``accounting``. Refuses a LoRA bias with no base bias and an expert
parameter loraship cannot reach.
"""

from __future__ import annotations

from collections.abc import Iterable

from loraship.engine.adapter import LoraModule
from loraship.engine.conversions import FusedParam, Piece
from loraship.engine.layouts import place_fused
from loraship.engine.plan import LoraBiasStep, LoraStep, MethodStep, ReplaceStep, Step, TokenRowsStep
from loraship.engine.planning.state import PlanState
from loraship.errors import IncompatibleError, UnsupportedError
from loraship.methods.base import method_of

_ORDER = {ReplaceStep: 0, LoraStep: 1, MethodStep: 1, LoraBiasStep: 2, TokenRowsStep: 3}


def collect(state: PlanState) -> None:
    a = state.adapter
    for rep in a.replacements:
        _add(state, rep.module, rep.param, ReplaceStep(rep.tensor, rep.origin), [rep.tensor.name])
    for mod in a.lora_modules:
        keys = [mod.a.name, mod.b.name] + ([mod.magnitude.name] if mod.magnitude else [])
        fused = state.model.fused.get(f"{mod.module}.{mod.param}") if state.model is not None else None
        if mod.wraps_parameter and fused is not None:
            _add_fused(state, mod, fused, keys)
            continue
        how = state.model.uncut.get(f"{mod.module}.{mod.param}") if state.model is not None else None
        if how is not None:
            raise UnsupportedError(
                f"The adapter targets `{mod.module}.{mod.param}`, which transformers builds on load from {how}: "
                "loraship cannot carry a LoRA delta back through that conversion.",
                fix="Merge this adapter with PEFT (PeftModel.from_pretrained(base, adapter).merge_and_unload(), then "
                "save_pretrained()), and check the result with `loraship verify`.",
            )
        cut = state.model.pieces.get(f"{mod.module}.{mod.param}") if state.model is not None else None
        if cut is not None and not mod.wraps_parameter:
            _add_pieces(state, mod, cut, keys)
            continue
        if mod.wraps_parameter and state.resolve(f"{mod.module}.{mod.param}") is None:
            _refuse_converted_parameter(state, mod)
        _add(state, mod.module, mod.param, LoraStep(mod, "linear"), keys)
        if mod.bias is not None:
            weight = state.resolve(f"{mod.module}.{mod.param}")
            if state.resolve(f"{mod.module}.bias") is None and weight is not None:
                raise IncompatibleError(
                    f"The adapter has a LoRA bias (lora_bias=True) for `{mod.module}`, but the base layer "
                    f"`{weight}` has no bias to add it to.",
                    fix="Use the base model the adapter was trained on"
                    + state.trained_on()
                    + "; PEFT cannot merge this adapter into this base either.",
                )
            _add(state, mod.module, "bias", LoraBiasStep(mod), [mod.bias.name])
    lacking: list[tuple[str, str, str, str]] = []  # a parameter a method needs that the layer lacks in the base
    for m in a.method_modules:
        method = method_of(m.method)
        assert method is not None
        keys = [info.name for _, info in m.tensors]
        # The weight last: an adapter tensor is accounted to the last tensor it lands in.
        for param, required in reversed(method.params(m)):
            if required or state.resolve(f"{m.module}.{param}") is not None:
                _add(state, m.module, param, MethodStep(m, param), keys)
            weight = state.resolve(f"{m.module}.weight") if required and param != "weight" else None
            if weight is not None and state.resolve(f"{m.module}.{param}") is None:
                lacking.append((method.name, m.module, param, weight))
    if lacking:
        _refuse_lacking(state, lacking)
    for upd in a.token_updates:
        _add(state, upd.module, "weight", TokenRowsStep(upd), [upd.tensor.name])
    for key, why in a.ignored.items():
        state.accounting[key] = f"(ignored: {why})"


def _add(state: PlanState, module: str, param: str, step: Step, keys: Iterable[str]) -> None:
    keys = list(keys)
    name = f"{module}.{param}" if module else param
    state.slots.setdefault(name, []).append((_ORDER[type(step)], step, keys[0], keys))


def _add_fused(state: PlanState, mod: LoraModule, fused: FusedParam, keys: list[str]) -> None:
    """A LoRA on a parameter transformers fuses from per-expert tensors: one step per saved tensor."""
    shapes = {k: state.base.tensors[k].shape for ks in fused.sources for k in ks}
    for key, layout, part in place_fused(fused, mod, shapes, state.layouts, state.trained_on()):
        state.direct.setdefault(key, []).append((_ORDER[LoraStep], LoraStep(mod, layout, part), keys[0], keys))
    if fused.transpose is None:
        state.note_once(
            f"transformers builds `{_any_layer(fused.param)}` on load from per-expert tensors "
            f"({fused.describe()}): each expert's slice of the LoRA delta is merged into the tensors the "
            "checkpoint stores, in their layout."
        )


def _add_pieces(state: PlanState, mod: LoraModule, cut: tuple[tuple[str, Piece], ...], keys: list[str]) -> None:
    """A LoRA on a parameter transformers cuts from (or joins of) stored tensors: one step on each of them."""
    param = cut[0][1].param
    if mod.layer != "linear" or mod.magnitude is not None or mod.bias is not None:
        kind = "DoRA" if mod.magnitude is not None else ("a LoRA bias" if mod.bias is not None else "an embedding LoRA")
        raise UnsupportedError(
            f"The adapter has {kind} on `{param}`, which transformers builds on load from "
            + ", ".join(f"`{k}`" for k, _ in cut)
            + ": loraship merges only plain LoRA through that conversion.",
            fix="Merge this adapter with PEFT (PeftModel.from_pretrained(base, adapter).merge_and_unload(), then "
            "save_pretrained()), and check the result with `loraship verify`.",
        )
    made = (mod.b.shape[0], mod.a.shape[1]) if mod.a.shape and mod.b.shape else ()
    if made != cut[0][1].shape:
        state.layouts.shape_error(f"`{param}`", cut[0][1].shape, f"lora_B {list(mod.b.shape)} @ lora_A "
                                  f"{list(mod.a.shape)}", made)  # fmt: skip
    for key, piece in cut:
        state.direct.setdefault(key, []).append((_ORDER[LoraStep], LoraStep(mod, "linear", piece=piece), keys[0], keys))
    state.note_once(
        f"transformers builds some parameters on load by cutting or joining stored tensors (`{_any_layer(param)}` "
        f"from {', '.join(f'`{_any_layer(k)}`' for k, _ in cut)}): each LoRA delta is merged into the rows of the "
        "stored tensors it covers, in their layout."
    )


def _refuse_lacking(state: PlanState, lacking: list[tuple[str, str, str, str]]) -> None:
    """A method's module changes a parameter (BEFT's bias) the base layer does not have: nothing to merge it into."""
    name, module, param, weight = lacking[0]
    more = f" (and of {len(lacking) - 1} more layer(s))" if len(lacking) > 1 else ""
    raise IncompatibleError(
        f"The {name} adapter changes the {param} of `{module}`{more}, but that layer has no {param} in the base model "
        f"`{state.base_label}` (only `{weight}`): there is nothing to merge the change into, and PEFT cannot merge "
        "it either.",
        fix="If this is not the base the adapter was trained on"
        + state.trained_on()
        + f", use that one; otherwise ship the adapter unmerged (PEFT runs it so), or train it again without "
        f"targeting layers that have no {param}.",
    )


def _refuse_converted_parameter(state: PlanState, mod: LoraModule) -> None:
    layer = mod.module.rsplit(".", 2)[0] + "."
    stored = next((n for n in state.base.tensors if n.startswith(layer) and "expert" in n), None)
    example = f" (e.g. `{stored}`)" if stored else ""
    raise UnsupportedError(
        f"The adapter targets the expert parameter `{mod.module}.{mod.param}` (target_parameters), which the "
        f"base checkpoint does not store under that name: transformers builds it on load from per-expert "
        f"tensors{example}, and loraship does not merge through that conversion yet.",
        fix="Merge this adapter with PEFT (PeftModel.from_pretrained(base, adapter).merge_and_unload(), then "
        "save_pretrained()), and check the result with `loraship verify`.",
    )


def _any_layer(name: str) -> str:
    """``model.layers.3.mlp.experts.gate_up_proj`` -> ``model.layers.*.mlp.experts.gate_up_proj``."""
    return ".".join("*" if p.isdigit() else p for p in name.split("."))
