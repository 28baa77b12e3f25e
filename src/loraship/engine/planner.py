"""Base checkpoint + adapter -> :class:`~loraship.engine.plan.MergePlan`: what each output tensor becomes. Pure.

The plan is a list of output tensors, each with the base tensor it starts from and the steps
applied to it (replace by a trained copy, add a LoRA delta, DoRA, a LoRA bias, replace rows). It
is computed from tensor headers only, so ``loraship plan`` prints it without reading tensor data,
and the executor (:mod:`loraship.engine.merge`) only carries it out. Every adapter tensor must land in
the plan or be named as ignored with a reason: a merge never drops part of an adapter silently.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from loraship.engine import quantized
from loraship.engine.adapter import AdapterSpec, LoraModule
from loraship.engine.conversions import FusedParam
from loraship.engine.heads import head_config
from loraship.engine.layouts import Layouts, place_fused
from loraship.engine.model_map import ModelMap
from loraship.engine.plan import (
    LoraBiasStep,
    LoraStep,
    MergePlan,
    ReplaceStep,
    Step,
    TensorPlan,
    TokenRowsStep,
)
from loraship.engine.quantized import check_base, dequantized
from loraship.engine.safetensors_io import DTYPE_NAMES, FLOAT_CODES, Checkpoint, TensorInfo
from loraship.errors import BaseModelError, IncompatibleError, UnsupportedError

# --------------------------------------------------------------------------- base checks


# --------------------------------------------------------------------------- name resolution


class NameResolver:
    """Maps adapter parameter names to base tensor names when transformers cannot build the model.

    transformers loads a checkpoint into a model whose names differ at most by the model's
    ``base_model_prefix``, added or removed on one side (a ``BertModel`` checkpoint into
    ``BertForSequenceClassification``). Without the class, any single leading segment that is not
    a layer number stands in for that prefix: it is added to or removed from the adapter's name,
    never removed from both sides (that would map ``classifier.dense`` onto ``lm_head.dense``).
    """

    def __init__(self, names: Iterable[str]) -> None:
        self.names = set(names)
        self._by_tail: dict[str, list[str]] = {}
        for name in self.names:
            head, _, tail = name.partition(".")
            if tail and not head.isdigit():
                self._by_tail.setdefault(tail, []).append(name)

    def resolve(self, module: str, param: str) -> str | None:
        full = f"{module}.{param}" if module else param
        if full in self.names:
            return full
        head, _, tail = full.partition(".")
        if tail and not head.isdigit() and tail in self.names:
            return tail
        found = self._by_tail.get(full, [])
        return found[0] if len(found) == 1 else None


# --------------------------------------------------------------------------- planning


@dataclass
class _Target:
    """Steps collected for one base tensor (or one new / untied tensor)."""

    name: str
    source: TensorInfo | None
    steps: list[tuple[int, Step, str]] = field(default_factory=list)  # (order, step, adapter label)
    note: str | None = None


#: A collected step: (order, step, first adapter key, all its adapter keys).
_Entry = tuple[int, Step, str, list[str]]

_ORDER = {ReplaceStep: 0, LoraStep: 1, LoraBiasStep: 2, TokenRowsStep: 3}


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
    planner = _Planner(base, base_config, adapter, model, base_label)
    return planner.build(dtype)


#: Steps on a tied parameter that PEFT's unmerged model applies to every module sharing it: a saved
#: base layer is loaded into the shared parameter, trainable tokens wrap the tied layers too.
def _is_shared_step(step: Step, ensure_weight_tying: bool) -> bool:
    if isinstance(step, ReplaceStep) and step.origin == "saved_base_layer":
        return True
    return isinstance(step, TokenRowsStep) or ensure_weight_tying


class _Planner:
    def __init__(
        self,
        base: Checkpoint,
        config: Mapping[str, Any],
        adapter: AdapterSpec,
        model: ModelMap | None,
        base_label: str,
    ) -> None:
        self.base = base
        self.config = config
        self.adapter = adapter
        self.model = model
        self.resolver = NameResolver(base.tensors)
        self.base_label = base_label
        self.targets: dict[str, _Target] = {}
        self.unmatched: list[str] = []
        self.notes: list[str] = []
        self.accounting: dict[str, str] = {}
        self.config_updates: dict[str, Any] = {}
        self.model_type = str(config.get("model_type", ""))
        # Steps per model parameter name (``model.embed_tokens.weight``), before they are placed.
        self.slots: dict[str, list[_Entry]] = {}
        # Steps on checkpoint tensors named directly (the per-expert tensors of a fused parameter).
        self.direct: dict[str, list[_Entry]] = {}
        self.fused_sources = model.fused_sources if model is not None else frozenset()
        self.per_expert: list[str] = []  # per-expert tensors an adapter saved under transformers v4 names
        self.scales = quantized.scale_pairs(base, config)
        self.layouts = Layouts(
            self.model_type, adapter.fan_in_fan_out, model.transposed_experts if model is not None else frozenset(),
            self._trained_on(), self._note_once,
        )  # fmt: skip  # FP8 weight -> its scale, dequantized on the way

    # -- collection

    def _add(self, module: str, param: str, step: Step, keys: Iterable[str]) -> None:
        keys = list(keys)
        name = f"{module}.{param}" if module else param
        self.slots.setdefault(name, []).append((_ORDER[type(step)], step, keys[0], keys))

    def collect(self) -> None:
        a = self.adapter
        for rep in a.replacements:
            self._add(rep.module, rep.param, ReplaceStep(rep.tensor, rep.origin), [rep.tensor.name])
        for mod in a.lora_modules:
            keys = [mod.a.name, mod.b.name] + ([mod.magnitude.name] if mod.magnitude else [])
            fused = self.model.fused.get(f"{mod.module}.{mod.param}") if self.model is not None else None
            if mod.wraps_parameter and fused is not None:
                self._add_fused(mod, fused, keys)
                continue
            if mod.wraps_parameter and self._resolve(f"{mod.module}.{mod.param}") is None:
                self._refuse_converted_parameter(mod)
            self._add(mod.module, mod.param, LoraStep(mod, "linear"), keys)
            if mod.bias is not None:
                weight = self._resolve(f"{mod.module}.{mod.param}")
                if self._resolve(f"{mod.module}.bias") is None and weight is not None:
                    raise IncompatibleError(
                        f"The adapter has a LoRA bias (lora_bias=True) for `{mod.module}`, but the base layer "
                        f"`{weight}` has no bias to add it to.",
                        fix="Use the base model the adapter was trained on"
                        + self._trained_on()
                        + "; PEFT cannot merge this adapter into this base either.",
                    )
                self._add(mod.module, "bias", LoraBiasStep(mod), [mod.bias.name])
        for upd in a.token_updates:
            self._add(upd.module, "weight", TokenRowsStep(upd), [upd.tensor.name])
        for key, why in a.ignored.items():
            self.accounting[key] = f"(ignored: {why})"

    def _add_fused(self, mod: LoraModule, fused: FusedParam, keys: list[str]) -> None:
        """A LoRA on a parameter transformers fuses from per-expert tensors: one step per saved tensor."""
        shapes = {k: self.base.tensors[k].shape for ks in fused.sources for k in ks}
        for key, layout, part in place_fused(fused, mod, shapes, self.layouts, self._trained_on()):
            self.direct.setdefault(key, []).append((_ORDER[LoraStep], LoraStep(mod, layout, part), keys[0], keys))
        if fused.transpose is None:
            self._note_once(
                f"transformers builds `{_any_layer(fused.param)}` on load from per-expert tensors "
                f"({fused.describe()}): each expert's slice of the LoRA delta is merged into the tensors the "
                "checkpoint stores, in their layout."
            )

    def _resolve(self, param: str) -> str | None:
        """The base tensor a model parameter is loaded from, if the checkpoint stores it."""
        if self.model is not None:
            found = self.model.stored.get(param)
            if found is None and param in self.fused_sources:  # a transformers v4 adapter: per-expert LoRAs
                self.per_expert.append(param)
                return param
            return found
        module, _, name = param.rpartition(".")
        return self.resolver.resolve(module, name)

    # -- placement: steps on model parameters -> output tensors

    def place(self) -> None:
        for name, entries in self.direct.items():
            target = self._target(name, self.base.tensors[name])
            for order, step, label, keys in entries:
                target.steps.append((order, step, label))
                for key in keys:
                    self.accounting.setdefault(key, name)
        grouped: dict[tuple[str, ...], dict[str, list[_Entry]]] = {}
        for param, entries in self.slots.items():
            group = self.model.group_of(param) if self.model is not None else (param,)
            if len(group) > 1:
                grouped.setdefault(group, {})[param] = entries
                continue
            self._place_single(param, entries)
        both = self.adapter.ensure_weight_tying
        one_sided_first = sorted(  # a group that unties decides tie_word_embeddings for the others
            grouped.items(), key=lambda kv: all(_is_shared_step(e[1], both) for es in kv[1].values() for e in es)
        )
        for group, by_member in one_sided_first:
            self._place_tied(group, by_member)
        if self.config_updates.get("tie_word_embeddings") is False and self.model is not None:
            for group in self.model.groups:  # untying by config splits groups the adapter does not touch too
                if group not in grouped:
                    self._place_tied(group, {})

    def _target(self, name: str, source: TensorInfo | None, note: str | None = None) -> _Target:
        if name not in self.targets:
            self.targets[name] = _Target(name, source, note=note)
        return self.targets[name]

    def _place_single(self, param: str, entries: list[_Entry]) -> None:
        name = self._resolve(param)
        if name is None:
            if not all(isinstance(e[1], ReplaceStep) for e in entries) or not self._may_be_new(param):
                self.unmatched.extend(k for e in entries for k in e[3])
                return
            new = self.model.saved_as.get(param, param) if self.model is not None else param
            target = self._target(new, None, note="new tensor from the adapter")
        else:
            target = self._target(name, self.base.tensors[name])
        for order, step, label, keys in entries:
            target.steps.append((order, step, label))
            for key in keys:
                self.accounting[key] = target.name

    def _may_be_new(self, param: str) -> bool:
        """A trained copy of a parameter the checkpoint lacks is a new head, if the model has it."""
        return self.model is None or param in self.model.saved_as

    def _place_tied(self, group: tuple[str, ...], by_member: Mapping[str, list[_Entry]]) -> None:
        """Steps on parameters that share one tensor: shared steps apply to all; one-sided ones untie.

        The reference is PEFT's *unmerged* model: a LoRA or a modules_to_save copy changes one module
        only (unless the adapter was trained with ``ensure_weight_tying``), so the merged model must
        store that module's weight on its own; merging it into the shared tensor (as PEFT's
        ``merge_and_unload`` does) would change the other modules too.
        """
        assert self.model is not None
        m = self.model
        stored = {p: m.stored[p] for p in group if p in m.stored}
        keys = [k for entries in by_member.values() for e in entries for k in e[3]]
        if not stored:
            self.unmatched.extend(keys)
            return
        source = self.base.tensors[next(iter(stored.values()))]
        both = self.adapter.ensure_weight_tying
        shared: list[_Entry] = []
        own: dict[str, list[_Entry]] = {}
        for param in group:  # the group's order: the input embedding's copy of a shared change wins
            for entry in by_member.get(param, []):
                if not _is_shared_step(entry[1], both):
                    own.setdefault(param, []).append(entry)
                elif any(type(s[1]) is type(entry[1]) for s in shared):
                    if isinstance(entry[1], LoraStep):
                        self._note_once(
                            "The adapter ties the output embedding's LoRA to the input embedding's "
                            "(ensure_weight_tying): the delta is applied once, to the shared weight."
                        )
                    self._account(entry[3], None)  # the same shared change saved twice: applied once
                else:
                    shared.append(entry)
        direct = {p for p in group if m.saved_as.get(p) == stored.get(p)}
        if not own and self.config_updates.get("tie_word_embeddings") is not False:
            first = None
            for name in dict.fromkeys(stored.values()):  # every stored copy of the group stays identical
                target = self._target(name, self.base.tensors[name])
                target.steps.extend(e[:3] for e in shared)
                first = first or target.name
            for entry in shared:
                self._account(entry[3], first)
            return
        parts: list[tuple[str, ...]] = []
        if m.untie_by_config:  # tie_word_embeddings=false, if it separates every changed parameter
            parts = [tuple(p for p in g if p in group) for g in m.untied_groups if set(g) & set(group)]
            parts += [(p,) for p in group if not any(p in part for part in parts)]
            if any(len(part) > 1 and set(part) & set(own) for part in parts):
                parts = []
        by_config = bool(parts)
        if by_config:
            self.config_updates["tie_word_embeddings"] = False
        else:  # transformers loads tied tensors that are stored with different values untied
            rest = tuple(p for p in group if p not in own)
            parts = [(p,) for p in group if p in own] + ([rest] if rest else [])
        for part in parts:
            changed = [p for p in part if p in own]
            stored_here = [m.saved_as[p] for p in part if p in direct]
            name = stored_here[0] if stored_here else m.saved_as.get(changed[0] if changed else part[0], part[0])
            note = None if name == source.name else f"untied from {source.name}"
            target = self._target(name, source, note=note)
            entries = shared + (own[changed[0]] if changed else [])
            target.steps.extend(e[:3] for e in entries)
            for entry in entries:  # a shared change is accounted to the tensor that stored the group
                if entry not in shared or name == source.name or not set(entry[3]) & set(self.accounting):
                    self._account(entry[3], target.name)
        if own:
            names = ", ".join(f"`{m.saved_as.get(p, p)}`" for p in own)
            how = (
                "sets tie_word_embeddings=false"
                if by_config
                else f"keeps tie_word_embeddings ({m.model_class} ties them whatever it says, or reads more "
                "from it); transformers loads tied tensors stored with different values untied"
            )
            self._note_once(
                f"Untied the embeddings: `{source.name}` is shared by {len(group)} parameters, and the adapter "
                f"changes {names} on its own, so the merged model stores them separately and {how} (as base + "
                "adapter behaves; merging into the shared weight would change the others too)."
            )

    def _account(self, keys: Iterable[str], target: str | None) -> None:
        for key in keys:
            if target is not None:
                self.accounting[key] = target
            else:
                self.accounting.setdefault(key, "(ignored: the same shared change, saved under both tied names)")

    def _note_once(self, note: str) -> None:
        if note not in self.notes:
            self.notes.append(note)

    def _refuse_converted_parameter(self, mod: LoraModule) -> None:
        layer = mod.module.rsplit(".", 2)[0] + "."
        stored = next((n for n in self.base.tensors if n.startswith(layer) and "expert" in n), None)
        example = f" (e.g. `{stored}`)" if stored else ""
        raise UnsupportedError(
            f"The adapter targets the expert parameter `{mod.module}.{mod.param}` (target_parameters), which the "
            f"base checkpoint does not store under that name: transformers builds it on load from per-expert "
            f"tensors{example}, and loraship does not merge through that conversion yet.",
            fix="Merge this adapter with PEFT (PeftModel.from_pretrained(base, adapter).merge_and_unload(), then "
            "save_pretrained()), and check the result with `loraship verify`.",
        )

    def _trained_on(self) -> str:
        name = self.adapter.base_model_name_or_path
        return f" (adapter_config.json names `{name}`)" if name else ""

    def check_unmatched(self) -> None:
        if not self.unmatched:
            return
        a = self.adapter
        modules = {m.module for m in a.lora_modules} | {r.module for r in a.replacements}
        matched = {k for k, v in self.accounting.items() if not v.startswith("(ignored")}
        if not matched:
            trained = self.model.model_class if self.model is not None else a.base_model_class
            archs = self.config.get("architectures") or [self.model_type or "unknown"]
            detail = f" (the adapter was trained on `{trained}`; the base is `{archs[0]}`)" if trained else ""
            raise IncompatibleError(
                f"None of the {len(modules)} modules the adapter changes exist in the base model "
                f"`{self.base_label}`: the adapter was made for another architecture{detail}.",
                fix="Use the base model the adapter was trained on" + self._trained_on() + ".",
            )
        shown = ", ".join(f"`{k}`" for k in self.unmatched[:20])
        more = f" and {len(self.unmatched) - 20} more" if len(self.unmatched) > 20 else ""
        raise IncompatibleError(
            f"{len(self.unmatched)} adapter tensor(s) match no tensor of the base model `{self.base_label}`: "
            f"{shown}{more}.",
            fix="Use the base model the adapter was trained on"
            + self._trained_on()
            + "; merging without these tensors would silently drop part of the adapter.",
        )

    def check_tying_known(self) -> None:
        """Without transformers' view of the model, a change to a possibly tied embedding is refused."""
        if self.model is not None or not self.config.get("tie_word_embeddings", True):
            return
        touched = [
            t.name for t in self.targets.values()
            if t.source is not None and len(t.source.shape) == 2 and t.source.shape[0] == vocab_size(self.config)
        ]  # fmt: skip
        if touched:
            raise UnsupportedError(
                f"The adapter changes {', '.join(f'`{n}`' for n in touched)}, which may be tied to the other "
                "embedding, and transformers cannot build this model class to tell.",
                fix="Install the transformers version that has this model class (or pass --trust-remote-code "
                "where supported), or merge with PEFT and check the result with `loraship verify`.",
            )

    # -- output

    def build(self, dtype: str | None) -> MergePlan:
        self.collect()
        self.place()
        if self.per_expert:
            n = len(dict.fromkeys(self.per_expert))
            self._note_once(
                f"The adapter was saved under transformers v4 names (one LoRA per expert layer, {n} expert tensors "
                f"such as `{self.per_expert[0]}`): each is merged into the per-expert tensor it names, by the "
                "adapter's own math (W + scale·B·A). PEFT converts such adapters when it loads them into "
                "transformers v5 models, and gets some conversions wrong; `loraship verify` says when its "
                "reference does."
            )
        self.check_unmatched()
        self.check_tying_known()
        config_updates = self.config_updates
        out_code = DTYPE_NAMES[dtype] if dtype else None
        default_float = out_code or self._main_float_dtype()
        order = {name: i for i, name in enumerate(self.base.tensors)}
        plans: dict[str, TensorPlan] = {}
        for name, target in self.targets.items():
            plans[name] = self._tensor_plan(target, out_code, default_float)
        tensors: list[TensorPlan] = []
        for name, info in self.base.tensors.items():
            if name in plans:
                tensors.append(plans[name])
            else:
                code = out_code if (out_code and info.dtype in FLOAT_CODES) else info.dtype
                tensors.append(TensorPlan(name, info.shape, code, info))
        tensors.extend(p for n, p in plans.items() if n not in order)
        if quantized.method(self.config) in quantized.DEQUANTIZED:
            tensors, note = dequantized(tensors, self.config, self.scales, out_code, self.base_label)
            self.config_updates["quantization_config"] = None
            self._note_once(note)
        self._check_vocab(tensors, config_updates)
        if dtype:
            config_updates["dtype"] = dtype
        if any(t.source is None for t in tensors):
            trained = self.model.model_class if self.model is not None else self.adapter.base_model_class
            updates, head_note = head_config(self.config, self.adapter.config, trained, tensors)
            config_updates.update(updates)
            if head_note:
                self.notes.append(head_note)
        self._check_accounting()
        return MergePlan(
            tensors=tuple(tensors),
            config_updates=config_updates,
            accounting=dict(self.accounting),
            notes=tuple(self.notes),
            adapter=self.adapter,
        )

    def _tensor_plan(self, target: _Target, out_code: str | None, default_float: str) -> TensorPlan:
        steps = [s for _, s, _ in sorted(target.steps, key=lambda s: s[0])]
        kinds = Counter(type(s) for s in steps)
        if kinds[ReplaceStep] > 1:
            raise IncompatibleError(
                f"The adapter saves {kinds[ReplaceStep]} different trained copies of `{target.name}`.",
                fix="Save the adapter again with PEFT; keep the tensor in modules_to_save only once.",
            )
        if kinds[LoraStep] > 1:
            raise IncompatibleError(
                f"The adapter holds {kinds[LoraStep]} LoRAs for `{target.name}`.",
                fix="Save the adapter again with PEFT.",
            )
        source = target.source
        shape = source.shape if source is not None else None
        for step in steps:
            if isinstance(step, ReplaceStep):
                new_shape = step.tensor.shape
                resized_vocab = shape is not None and self._is_embedding(target, shape) and new_shape[1:] == shape[1:]
                if shape is not None and new_shape != shape and not resized_vocab:
                    raise IncompatibleError(
                        f"Shape mismatch for `{target.name}`: the base tensor is {list(shape)} but the "
                        f"adapter's trained copy `{step.tensor.name}` is {list(new_shape)}.",
                        fix="Use the base model the adapter was trained on" + self._trained_on() + ".",
                    )
                shape = new_shape
        if shape is None:  # pragma: no cover - a target always has a source or a replacement
            raise AssertionError(target.name)
        resolved: list[Step] = []
        for step in steps:
            if isinstance(step, LoraStep) and step.part is not None:  # laid out with its fused parameter
                self._check_float(target, source)
                resolved.append(step)
            elif isinstance(step, LoraStep):
                layout = self.layouts.layer(target.name, shape, step.module)
                if step.dora and layout in ("parameter", "experts", "experts_transposed"):
                    raise UnsupportedError(f"DoRA on expert parameters (`{target.name}`) is not supported.")
                self._check_float(target, source)
                resolved.append(LoraStep(step.module, layout))
            elif isinstance(step, LoraBiasStep):
                bias = step.module.bias
                if source is not None and bias is not None and source.shape != bias.shape:
                    self.layouts.shape_error(f"`{target.name}`", source.shape, f"lora_B.bias {list(bias.shape)}")
                resolved.append(step)
            elif isinstance(step, TokenRowsStep):
                rows = step.update.tensor.shape
                if len(shape) != 2 or rows[1:] != shape[1:] or max(step.update.indices, default=0) >= shape[0]:
                    raise IncompatibleError(
                        f"Trainable tokens for `{target.name}` do not fit: the embedding is {list(shape)}, the "
                        f"adapter replaces rows {list(step.update.indices)[:8]} with a {list(rows)} tensor.",
                        fix="Use the base model the adapter was trained on" + self._trained_on() + ".",
                    )
                resolved.append(step)
            else:
                resolved.append(step)
        if source is not None:
            code = out_code if (out_code and source.dtype in FLOAT_CODES) else source.dtype
        else:
            code = default_float
        if resolved and self._kept_in_float32(target.name, code):
            code = "F32"  # transformers loads it in float32 and PEFT merges it there: no rounding to half
        return TensorPlan(target.name, tuple(shape), code, source, tuple(resolved), target.note)

    def _kept_in_float32(self, name: str, code: str) -> bool:
        m = self.model
        kept = m.keep_fp32.get(code, frozenset()) if m is not None else frozenset()
        return any(m.saved_as.get(p) == name or m.stored.get(p) == name for p in kept) if m is not None else False

    def _check_float(self, target: _Target, source: TensorInfo | None) -> None:
        packed = isinstance(source, quantized.PackedTensor)
        if source is not None and source.dtype not in FLOAT_CODES and source.name not in self.scales and not packed:
            raise BaseModelError(
                f"`{target.name}` in the base model `{self.base_label}` is stored as {source.dtype}, not as a "
                "floating-point tensor: it is quantized, and a LoRA delta cannot be merged into it.",
                fix="Merge into the full-precision model this one was quantized from: pass it with --base "
                "(in loraship.yaml: `base:`).",
            )

    def _embedding_sources(self) -> set[str]:
        """Base tensors the input and output embeddings are loaded from."""
        m = self.model
        if m is None:
            return set()
        params = [f"{e}.weight" for e in (m.input_embedding, m.output_embedding) if e]
        return {m.stored[p] for p in params if p in m.stored} | {m.saved_as[p] for p in params if p in m.saved_as}

    def _is_embedding(self, target: _Target, shape: tuple[int, ...]) -> bool:
        known = self._embedding_sources()
        if known:
            return target.name in known or (target.source is not None and target.source.name in known)
        vocab = vocab_size(self.config)  # no architecture information: go by the vocabulary size
        return len(shape) == 2 and vocab is not None and shape[0] == vocab

    def _check_vocab(self, tensors: list[TensorPlan], updates: dict[str, Any]) -> None:
        """A resized vocabulary must resize every embedding the merged model stores."""
        old = vocab_size(self.config)
        embeddings = [t for t in tensors if self._is_embedding(self.targets.get(t.name) or _Target(t.name, t.source),
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
        self.notes.append(f"The adapter resizes the vocabulary from {old} to {size} tokens: config.json follows.")

    def _main_float_dtype(self) -> str:
        counts = Counter(t.dtype for t in self.base.tensors.values() if t.dtype in FLOAT_CODES)
        if counts:
            return counts.most_common(1)[0][0]
        name = str(self.config.get("dtype") or self.config.get("torch_dtype") or "float32")
        return DTYPE_NAMES.get(name, "F32")

    def _check_accounting(self) -> None:
        missing = [k for k in self.adapter.tensors if k not in self.accounting]
        if missing:  # pragma: no cover - every parsed tensor is collected above
            raise AssertionError(f"adapter tensors not planned: {missing}")


def _any_layer(name: str) -> str:
    """``model.layers.3.mlp.experts.gate_up_proj`` -> ``model.layers.*.mlp.experts.gate_up_proj``."""
    return ".".join("*" if p.isdigit() else p for p in name.split("."))


def vocab_size(config: Mapping[str, Any]) -> int | None:
    """config.json's vocabulary size (or its text model's, for multimodal configs)."""
    value = config.get("vocab_size")
    if value is None and isinstance(config.get("text_config"), dict):
        value = config["text_config"].get("vocab_size")
    return int(value) if isinstance(value, int) else None
