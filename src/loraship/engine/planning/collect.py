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
from loraship.engine.conversions import FusedParam
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
    for m in a.method_modules:
        method = method_of(m.method)
        assert method is not None
        keys = [info.name for _, info in m.tensors]
        # The weight last: an adapter tensor is accounted to the last tensor it lands in.
        for param, required in reversed(method.params(m)):
            if required or state.resolve(f"{m.module}.{param}") is not None:
                _add(state, m.module, param, MethodStep(m, param), keys)
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
