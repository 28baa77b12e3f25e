"""Phase 4, build: placed targets -> the :class:`~loraship.engine.plan.MergePlan`. Pure.

Input: the :class:`~loraship.engine.planning.state.PlanState` after place and the checks, and the
output dtype name (None keeps each tensor's). Output: the plan: a
:class:`~loraship.engine.plan.TensorPlan` per output tensor in the base's order (steps ordered and
their layouts resolved, shapes checked, the dtype decided: the output dtype for floats, float32
where transformers keeps it), FP8 / MXFP4 bases dequantized, new tensors last, and the config.json
updates (vocabulary, dtype, a new head). Refuses a target changed twice the same way and shapes
that do not fit.
"""

from __future__ import annotations

from collections import Counter
from itertools import pairwise

from loraship.engine import quantized
from loraship.engine.heads import head_config
from loraship.engine.plan import (
    LoraBiasStep,
    LoraStep,
    MergePlan,
    MethodStep,
    ReplaceStep,
    Step,
    TensorPlan,
    TokenRowsStep,
)
from loraship.engine.planning.checks import check_accounting, check_float, check_vocab
from loraship.engine.planning.state import PlanState, Target
from loraship.engine.quantized import dequantized
from loraship.engine.safetensors_io import DTYPE_NAMES, FLOAT_CODES, TensorInfo
from loraship.errors import IncompatibleError, UnsupportedError
from loraship.methods.base import Unsupported, method_of


def build(state: PlanState, dtype: str | None) -> MergePlan:
    config_updates = state.config_updates
    out_code = DTYPE_NAMES[dtype] if dtype else None
    default_float = out_code or _main_float_dtype(state)
    order = {name: i for i, name in enumerate(state.base.tensors)}
    plans: dict[str, TensorPlan] = {}
    layers = _method_layers(state)
    for name, target in state.targets.items():
        plans[name] = _tensor_plan(state, target, out_code, default_float, layers)
    tensors: list[TensorPlan] = []
    for name, info in state.base.tensors.items():
        if name in plans:
            tensors.append(plans[name])
        else:
            code = out_code if (out_code and info.dtype in FLOAT_CODES) else info.dtype
            tensors.append(TensorPlan(name, info.shape, code, info))
    tensors.extend(p for n, p in plans.items() if n not in order)
    if quantized.method(state.config) in quantized.DEQUANTIZED:
        tensors, note = dequantized(tensors, state.config, state.scales, out_code, state.base_label)
        state.config_updates["quantization_config"] = None
        state.note_once(note)
    check_vocab(state, tensors, config_updates)
    if dtype:
        config_updates["dtype"] = dtype
    if any(t.source is None for t in tensors):
        trained = state.model.model_class if state.model is not None else state.adapter.base_model_class
        updates, head_note = head_config(state.config, state.adapter.config, trained, tensors)
        config_updates.update(updates)
        if head_note:
            state.notes.append(head_note)
        if state.model is not None and updates.get("architectures") == [state.model.model_class]:
            tensors = _without_other_heads(state, tensors)
    check_accounting(state)
    return MergePlan(
        tensors=tuple(tensors),
        config_updates=config_updates,
        accounting=dict(state.accounting),
        notes=tuple(state.notes),
        adapter=state.adapter,
    )


def _disjoint(steps: list[Step]) -> bool:
    """Whether the LoRA pieces filling one stored tensor cover distinct rows (a split's parts, once each)."""
    spans = sorted((s.piece.start, s.piece.start + s.piece.length) for s in steps
                   if isinstance(s, LoraStep) and s.piece is not None)  # fmt: skip
    return all(a[1] <= b[0] for a, b in pairwise(spans))


def _without_other_heads(state: PlanState, tensors: list[TensorPlan]) -> list[TensorPlan]:
    """The output without the base's tensors the adapter's class does not load (a pretraining head, ``cls.*`` of
    a BERT masked-LM checkpoint under a classifier): the merged folder holds that class's tensors, as PEFT's saved
    merge does, instead of unexpected keys."""
    assert state.model is not None
    unchanged = [t.name for t in tensors if t.source is not None and not t.steps]
    dropped = set(state.model.unloaded(unchanged))
    if not dropped:
        return tensors
    shown = ", ".join(f"`{n}`" for n in sorted(dropped)[:4]) + (" ..." if len(dropped) > 4 else "")
    state.notes.append(
        f"{len(dropped)} base tensor(s) that {state.model.model_class} does not load ({shown}: the base's own head) "
        "are left out of the merged folder, as PEFT's saved merge leaves them out."
    )
    return [t for t in tensors if t.name not in dropped]


#: A method's layers for :meth:`Method.with_layers`: ``(module, out, in)`` each, and whether in the model's order.
Layers = tuple[tuple[tuple[str, int, int], ...], bool]


def _method_layers(state: PlanState) -> dict[str, Layers]:
    """PEFT type -> ``(module, out, in)`` of every base weight its modules change, in the model's order of modules
    (the base checkpoint's where the model class is unknown), and whether that order is the model's."""
    found: dict[str, list[tuple[int, tuple[str, int, int]]]] = {}
    unordered: set[str] = set()
    params = {name: i for i, name in enumerate(state.model.params)} if state.model is not None else {}
    stored = {name: i for i, name in enumerate(state.base.tensors)}
    for target in state.targets.values():
        for _, step, _ in target.steps:
            shape = target.source.shape if target.source is not None else ()
            if isinstance(step, MethodStep) and step.param == "weight" and len(shape) >= 2:
                module = step.module.module
                out_features, in_features = (shape[1], shape[0]) if state.layouts.conv1d(module) else shape[:2]
                order = params.get(f"{module}.weight", len(params) + stored.get(target.name, 0))
                if f"{module}.weight" not in params:
                    unordered.add(step.module.method)
                found.setdefault(step.module.method, []).append((order, (module, out_features, in_features)))
    return {
        method: (tuple(layer for _, layer in sorted(layers)), method not in unordered)
        for method, layers in found.items()
    }


def _tensor_plan(
    state: PlanState,
    target: Target,
    out_code: str | None,
    default_float: str,
    layers: dict[str, Layers],
) -> TensorPlan:
    steps = [s for _, s, _ in sorted(target.steps, key=lambda s: s[0])]
    kinds = Counter(type(s) for s in steps)
    if kinds[ReplaceStep] > 1:
        raise IncompatibleError(
            f"The adapter saves {kinds[ReplaceStep]} different trained copies of `{target.name}`.",
            fix="Save the adapter again with PEFT; keep the tensor in modules_to_save only once.",
        )
    filling = sum(1 for s in steps if isinstance(s, LoraStep) and s.piece is not None and s.piece.into)
    if kinds[LoraStep] + kinds[MethodStep] - filling + min(filling, 1) > 1 or (filling and not _disjoint(steps)):
        raise IncompatibleError(
            f"The adapter holds {kinds[LoraStep] + kinds[MethodStep]} changes of `{target.name}`.",
            fix="Save the adapter again with PEFT.",
        )
    source = target.source
    shape = source.shape if source is not None else None
    for step in steps:
        if isinstance(step, ReplaceStep):
            new_shape = step.tensor.shape
            resized_vocab = shape is not None and state.is_embedding(target, shape) and new_shape[1:] == shape[1:]
            if shape is not None and new_shape != shape and not resized_vocab:
                raise IncompatibleError(
                    f"Shape mismatch for `{target.name}`: the base tensor is {list(shape)} but the "
                    f"adapter's trained copy `{step.tensor.name}` is {list(new_shape)}.",
                    fix="Use the base model the adapter was trained on" + state.trained_on() + ".",
                )
            shape = new_shape
    if shape is None:  # pragma: no cover - a target always has a source or a replacement
        raise AssertionError(target.name)
    resolved: list[Step] = []
    for step in steps:
        if isinstance(step, LoraStep) and (step.part is not None or step.piece is not None):  # laid out already
            check_float(state, target, source)
            resolved.append(step)
        elif isinstance(step, LoraStep):
            layout = state.layouts.layer(target.name, shape, step.module)
            if step.dora and layout in ("parameter", "experts", "experts_transposed"):
                raise UnsupportedError(f"DoRA on expert parameters (`{target.name}`) is not supported.")
            check_float(state, target, source)
            resolved.append(LoraStep(step.module, layout))
        elif isinstance(step, MethodStep):
            resolved.append(
                _method_step(state, target, source, shape, step, layers.get(step.module.method, ((), True)))
            )
        elif isinstance(step, LoraBiasStep):
            bias = step.module.bias
            if source is not None and bias is not None and source.shape != bias.shape:
                state.layouts.shape_error(f"`{target.name}`", source.shape, f"lora_B.bias {list(bias.shape)}")
            resolved.append(step)
        elif isinstance(step, TokenRowsStep):
            rows = step.update.tensor.shape
            if len(shape) != 2 or rows[1:] != shape[1:] or max(step.update.indices, default=0) >= shape[0]:
                raise IncompatibleError(
                    f"Trainable tokens for `{target.name}` do not fit: the embedding is {list(shape)}, the "
                    f"adapter replaces rows {list(step.update.indices)[:8]} with a {list(rows)} tensor.",
                    fix="Use the base model the adapter was trained on" + state.trained_on() + ".",
                )
            resolved.append(step)
        else:
            resolved.append(step)
    if source is not None:
        code = out_code if (out_code and source.dtype in FLOAT_CODES) else source.dtype
    else:
        code = default_float
    kept = [s.piece.param for s in resolved if isinstance(s, LoraStep) and s.piece is not None]
    if resolved and (_kept_in_float32(state, target.name, code) or _pieces_kept_in_float32(state, kept, code)):
        code = "F32"  # transformers loads it in float32 and PEFT merges it there: no rounding to half
    return TensorPlan(target.name, tuple(shape), code, source, tuple(resolved), target.note)


def _method_step(
    state: PlanState,
    target: Target,
    source: TensorInfo | None,
    shape: tuple[int, ...],
    step: MethodStep,
    layers: Layers,
) -> MethodStep:
    """A method's step, with the layer's layout, once its shapes fit the base tensor."""
    method = method_of(step.module.method)
    assert method is not None
    module = method.with_layers(step.module, layers[0], ordered=layers[1])
    fan_in_fan_out = step.param == "weight" and state.layouts.conv1d(module.module)
    problem = method.shape_problem(module, step.param, shape, fan_in_fan_out)
    if isinstance(problem, Unsupported):
        raise UnsupportedError(
            f"`{target.name}`: {problem}.",
            fix="Keep this adapter unmerged (load it with PEFT on top of the base model), or train it without "
            f"{method.name} on such layers.",
        )
    if problem is not None:
        raise IncompatibleError(
            f"Shape mismatch for `{target.name}`: the base tensor is {list(shape)}, but {problem}.",
            fix="Use the base model the adapter was trained on" + state.trained_on() + ".",
        )
    check_float(state, target, source)
    return MethodStep(module, step.param, fan_in_fan_out)


def _kept_in_float32(state: PlanState, name: str, code: str) -> bool:
    m = state.model
    kept = m.keep_fp32.get(code, frozenset()) if m is not None else frozenset()
    return any(m.saved_as.get(p) == name or m.stored.get(p) == name for p in kept) if m is not None else False


def _pieces_kept_in_float32(state: PlanState, params: list[str], code: str) -> bool:
    """A stored tensor transformers cuts or transposes into parameters it keeps in float32 (ERGO's router)."""
    m = state.model
    return m is not None and bool(params) and all(p in m.keep_fp32.get(code, frozenset()) for p in params)


def _main_float_dtype(state: PlanState) -> str:
    counts = Counter(t.dtype for t in state.base.tensors.values() if t.dtype in FLOAT_CODES)
    if counts:
        return counts.most_common(1)[0][0]
    name = str(state.config.get("dtype") or state.config.get("torch_dtype") or "float32")
    return DTYPE_NAMES.get(name, "F32")
