"""Base checkpoint + adapter -> :class:`MergePlan`: what each output tensor becomes. Pure.

The plan is a list of output tensors, each with the base tensor it starts from and the steps
applied to it (replace by a trained copy, add a LoRA delta, DoRA, a LoRA bias, replace rows). It
is computed from tensor headers only, so ``loraship plan`` prints it without reading tensor data,
and the executor (:mod:`loraship.merge`) only carries it out. Every adapter tensor must land in
the plan or be named as ignored with a reason: a merge never drops part of an adapter silently.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from loraship.adapter import AdapterSpec, LoraModule, TokenUpdate
from loraship.errors import BaseModelError, IncompatibleError, UnsupportedError
from loraship.safetensors_io import FLOAT_CODES, Checkpoint, TensorInfo, nbytes_of

#: Model types whose attention/MLP projections are transformers' ``Conv1D`` (weights stored
#: (in, out)); PEFT forces ``fan_in_fan_out=True`` for those layers and False for ``nn.Linear``.
CONV1D_MODEL_TYPES = frozenset(
    {"gpt2", "openai-gpt", "imagegpt", "decision_transformer", "clvp", "clvp_encoder", "clvp_decoder"}
)
CONV1D_LAYER_NAMES = frozenset({"c_attn", "c_proj", "c_fc", "q_attn"})

DTYPE_NAMES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "float64": "F64"}
CODE_NAMES = {v: k for k, v in DTYPE_NAMES.items()}

Layout = Literal["linear", "conv1d", "conv", "embedding", "parameter", "experts", "experts_transposed"]


@dataclass(frozen=True)
class ArchInfo:
    """What the planner needs to know about the model class, beyond the checkpoint's headers.

    Attributes:
        input_embedding: Module path of the input embedding in the adapter's naming.
        output_embedding: Module path of the output embedding (``lm_head``), if the model has one.
        tied: The output embedding shares the input embedding's weight.
        transposed_experts: Expert modules whose 3-D parameters are stored (experts, in, out).
    """

    input_embedding: str | None = None
    output_embedding: str | None = None
    tied: bool = False
    transposed_experts: frozenset[str] = frozenset()


# --------------------------------------------------------------------------- steps


@dataclass(frozen=True)
class ReplaceStep:
    """The tensor takes the values of a trained copy saved in the adapter (cast to its dtype)."""

    tensor: TensorInfo
    origin: str


@dataclass(frozen=True)
class LoraStep:
    """Add the module's LoRA delta (DoRA when it has a magnitude vector)."""

    module: LoraModule
    layout: Layout

    @property
    def dora(self) -> bool:
        return self.module.magnitude is not None


@dataclass(frozen=True)
class LoraBiasStep:
    """``lora_bias=True``: add ``scale · lora_B.bias`` to the module's bias."""

    module: LoraModule


@dataclass(frozen=True)
class TokenRowsStep:
    """``trainable_token_indices``: replace rows of an embedding."""

    update: TokenUpdate


Step = ReplaceStep | LoraStep | LoraBiasStep | TokenRowsStep


@dataclass(frozen=True)
class TensorPlan:
    """One output tensor: where it starts from and what is applied to it, in order.

    Attributes:
        name: Name in the output checkpoint.
        shape: Output shape.
        dtype: Output safetensors dtype code.
        source: The base tensor it starts from; None when a trained copy provides all of it.
        steps: What is applied, in order.
        note: Why this tensor is special (e.g. an untied copy), for the plan's table.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    source: TensorInfo | None
    steps: tuple[Step, ...] = ()
    note: str | None = None

    @property
    def changed(self) -> bool:
        return bool(self.steps) or self.source is None or self.source.dtype != self.dtype

    @property
    def copies_bytes(self) -> bool:
        """The base bytes go to the output as they are (no decoding)."""
        return not self.steps and self.source is not None and self.source.dtype == self.dtype

    @property
    def nbytes(self) -> int:
        return nbytes_of(self.dtype, self.shape)

    def describe(self) -> str:
        """A short human-readable summary of the steps, e.g. ``LoRA r=16 s=2``."""
        parts = []
        for step in self.steps:
            if isinstance(step, ReplaceStep):
                parts.append(f"replace ({step.origin.replace('_', ' ')})")
            elif isinstance(step, LoraStep):
                m = step.module
                kind = "DoRA" if step.dora else "LoRA"
                layout = "" if step.layout == "linear" else f" {step.layout}"
                parts.append(f"{kind}{layout} r={m.rank} scale={m.scale:g}")
            elif isinstance(step, LoraBiasStep):
                parts.append(f"+ lora bias scale={step.module.scale:g}")
            else:
                parts.append(f"replace {len(step.update.indices)} token rows")
        if self.source is not None and self.source.dtype != self.dtype:
            parts.append(f"cast {self.source.dtype} -> {self.dtype}")
        if self.note:
            parts.append(self.note)
        return "; ".join(parts) or "copy"


@dataclass(frozen=True)
class MergePlan:
    """The whole merge, decided before any tensor data is read.

    Attributes:
        tensors: The output tensors, in the order they are written.
        config_updates: Changes to the base's config.json (dtype, vocab_size, tie_word_embeddings...).
        accounting: Every adapter tensor -> the output tensor(s) it lands in, or why it is ignored.
        notes: What users should know about this merge (untied embeddings, overridden options).
    """

    tensors: tuple[TensorPlan, ...]
    config_updates: Mapping[str, Any]
    accounting: Mapping[str, str]
    notes: tuple[str, ...] = ()
    adapter: AdapterSpec | None = field(default=None, compare=False, repr=False)

    @property
    def changed(self) -> tuple[TensorPlan, ...]:
        return tuple(t for t in self.tensors if t.changed)

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def largest_tensor_bytes(self) -> int:
        return max((t.nbytes for t in self.tensors), default=0)


# --------------------------------------------------------------------------- base checks


def check_base(config: Mapping[str, Any], *, where: str) -> None:
    """Refuse bases whose weights cannot take a LoRA delta (quantized checkpoints).

    Raises:
        BaseModelError: The base is quantized.
    """
    quant = config.get("quantization_config")
    if quant is None and isinstance(config.get("text_config"), dict):
        quant = config["text_config"].get("quantization_config")
    if quant is not None:
        method = quant.get("quant_method", "unknown method") if isinstance(quant, dict) else "unknown method"
        bits = ""
        if isinstance(quant, dict):
            if quant.get("load_in_4bit"):
                bits = ", 4-bit"
            elif quant.get("load_in_8bit"):
                bits = ", 8-bit"
            elif quant.get("bits"):
                bits = f", {quant['bits']}-bit"
        raise BaseModelError(
            f"The base model `{where}` is quantized ({method}{bits}; config.json has a "
            "quantization_config): merging a LoRA delta into quantized weights loses most of it.",
            fix="Merge into the full-precision model this one was quantized from (its model card usually "
            "names it): pass it with --base (in loraship.yaml: `base:`).",
        )


# --------------------------------------------------------------------------- name resolution


class NameResolver:
    """Maps adapter module paths to base tensor names.

    The adapter names modules as the model class it was trained on does; the base checkpoint may
    carry a wrapper prefix more or less (``transformer.``, ``bert.``, ``model.``). Exact names win;
    otherwise a name that differs only by such a prefix (at most two segments, none of them a
    layer number) is accepted when it is unique. Anything looser could map a module of one layer
    onto another layer's tensor.
    """

    MAX_PREFIX = 2

    def __init__(self, names: Iterable[str]) -> None:
        self.names = set(names)
        self._by_tail: dict[str, list[str]] = {}
        for name in self.names:
            pieces = name.split(".")
            for i in range(1, min(self.MAX_PREFIX, len(pieces) - 1) + 1):
                if _is_wrapper(pieces[:i]):
                    self._by_tail.setdefault(".".join(pieces[i:]), []).append(name)

    def resolve(self, module: str, param: str) -> str | None:
        full = f"{module}.{param}" if module else param
        if full in self.names:
            return full
        pieces = full.split(".")
        for i in range(0, min(self.MAX_PREFIX, len(pieces) - 1) + 1):
            if not _is_wrapper(pieces[:i]):
                break
            tail = ".".join(pieces[i:])
            if i and tail in self.names:
                return tail
            found = self._by_tail.get(tail, [])
            if len(found) == 1:
                return found[0]
        return None


def _is_wrapper(segments: list[str]) -> bool:
    return not any(s.isdigit() for s in segments)


# --------------------------------------------------------------------------- planning


@dataclass
class _Target:
    """Steps collected for one base tensor (or one new / untied tensor)."""

    name: str
    source: TensorInfo | None
    steps: list[tuple[int, Step, str]] = field(default_factory=list)  # (order, step, adapter label)
    note: str | None = None


_ORDER = {ReplaceStep: 0, LoraStep: 1, LoraBiasStep: 2, TokenRowsStep: 3}


def plan_merge(
    base: Checkpoint,
    base_config: Mapping[str, Any],
    adapter: AdapterSpec,
    *,
    arch: ArchInfo | None = None,
    dtype: str | None = None,
    base_label: str = "base",
) -> MergePlan:
    """Decide every output tensor of merging ``adapter`` into ``base``. Reads no tensor data.

    Args:
        base: The base checkpoint's tensor headers.
        base_config: The base's config.json.
        adapter: The adapter.
        arch: Embedding names and tying (needed when the adapter touches embeddings).
        dtype: Output dtype name (``bfloat16``, ``float16``, ``float32``); None keeps each tensor's.
        base_label: How to name the base in messages.

    Raises:
        IncompatibleError: An adapter tensor matches no base tensor, or shapes disagree.
        UnsupportedError: A layer kind loraship cannot merge.
        BaseModelError: The base is quantized.
    """
    check_base(base_config, where=base_label)
    resolver = NameResolver(base.tensors)
    planner = _Planner(base, base_config, adapter, resolver, arch, base_label)
    return planner.build(dtype)


class _Planner:
    def __init__(
        self,
        base: Checkpoint,
        config: Mapping[str, Any],
        adapter: AdapterSpec,
        resolver: NameResolver,
        arch: ArchInfo | None,
        base_label: str,
    ) -> None:
        self.base = base
        self.config = config
        self.adapter = adapter
        self.resolver = resolver
        self.arch = arch or ArchInfo()
        self.base_label = base_label
        self.targets: dict[str, _Target] = {}
        self.unmatched: list[str] = []
        self.notes: list[str] = []
        self.accounting: dict[str, str] = {}
        self.model_type = str(config.get("model_type", ""))
        # The tied output embedding has no tensor of its own: steps on it are collected here.
        self.tied_output: _Target | None = None
        self.input_name: str | None = None
        self.output_name: str | None = None
        if self.arch.input_embedding:
            self.input_name = resolver.resolve(self.arch.input_embedding, "weight")
        if self.arch.output_embedding:
            self.output_name = resolver.resolve(self.arch.output_embedding, "weight")

    # -- collection

    def _target_for(self, module: str, param: str, *, allow_new: bool) -> _Target | None:
        name = self.resolver.resolve(module, param)
        is_output = module == self.arch.output_embedding or (name is not None and name == self.output_name)
        if self.arch.tied and self.input_name and param == "weight" and is_output:
            if self.tied_output is None:
                out_name = self.output_name or f"{module}.weight"
                self.tied_output = _Target(out_name, self.base.tensors[self.input_name])
            return self.tied_output
        if name is None:
            if not allow_new:
                return None
            name = f"{module}.{param}"
            if name not in self.targets:
                self.targets[name] = _Target(name, None, note="new tensor from the adapter")
            return self.targets[name]
        if name not in self.targets:
            self.targets[name] = _Target(name, self.base.tensors[name])
        return self.targets[name]

    def _add(self, target: _Target | None, step: Step, keys: Iterable[str]) -> None:
        keys = list(keys)
        if target is None:
            self.unmatched.extend(keys)
            return
        target.steps.append((_ORDER[type(step)], step, keys[0]))
        for key in keys:
            self.accounting[key] = target.name

    def collect(self) -> None:
        a = self.adapter
        for rep in a.replacements:
            self._add(self._target_for(rep.module, rep.param, allow_new=True), ReplaceStep(rep.tensor, rep.origin),
                      [rep.tensor.name])  # fmt: skip
        for mod in a.lora_modules:
            keys = [mod.a.name, mod.b.name] + ([mod.magnitude.name] if mod.magnitude else [])
            target = self._target_for(mod.module, mod.param, allow_new=False)
            if target is None and mod.param != "weight":
                self._refuse_converted_parameter(mod)
            self._add(target, LoraStep(mod, "linear"), keys)
            if mod.bias is not None:
                bias_target = self._target_for(mod.module, "bias", allow_new=False)
                if bias_target is None and target is not None:
                    raise IncompatibleError(
                        f"The adapter has a LoRA bias (lora_bias=True) for `{mod.module}`, but the base layer "
                        f"`{target.name}` has no bias to add it to.",
                        fix="Use the base model the adapter was trained on"
                        + self._trained_on()
                        + "; PEFT cannot merge this adapter into this base either.",
                    )
                self._add(bias_target, LoraBiasStep(mod), [mod.bias.name])
        for upd in a.token_updates:
            self._add(self._target_for(upd.module, "weight", allow_new=False), TokenRowsStep(upd), [upd.tensor.name])
        for key, why in a.ignored.items():
            self.accounting[key] = f"(ignored: {why})"

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
            trained = a.base_model_class
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

    # -- tied embeddings

    def resolve_tying(self) -> dict[str, Any]:
        """Split the steps on a tied input/output embedding pair; untie when they diverge.

        The reference is PEFT's *unmerged* model: a saved base layer is loaded into the shared
        parameter and trainable tokens wrap the tied output layer too, so both apply to both sides;
        a LoRA or a modules_to_save copy changes one side only, unless the adapter was trained with
        ``ensure_weight_tying``. Merging a one-sided change into the shared weight (as PEFT's
        ``merge_and_unload`` does) would change the other side too.
        """
        if not (self.arch.tied and self.input_name):
            return {}
        inp = self.targets.get(self.input_name)
        out = self.tied_output
        if inp is None and out is None:
            return {}
        both = self.adapter.ensure_weight_tying

        def shared(entry: tuple[int, Step, str]) -> bool:
            step = entry[1]
            if isinstance(step, ReplaceStep) and step.origin == "saved_base_layer":
                return True
            return isinstance(step, TokenRowsStep) or both

        in_steps = inp.steps if inp else []
        out_steps = out.steps if out else []
        in_shared = [e for e in in_steps if shared(e)]
        in_only = [e for e in in_steps if not shared(e)]
        out_shared = [e for e in out_steps if shared(e)]
        out_only = [e for e in out_steps if not shared(e)]
        # The same shared parameter saved under both names, or ensure_weight_tying's tied LoRA copy
        # on the output: one shared change, applied once.
        for kind in (ReplaceStep, LoraStep):
            if any(isinstance(e[1], kind) for e in in_shared):
                dropped = [e for e in out_shared if isinstance(e[1], kind)]
                out_shared = [e for e in out_shared if not isinstance(e[1], kind)]
                if dropped and kind is LoraStep:
                    self.notes.append(
                        "The adapter ties the output embedding's LoRA to the input embedding's "
                        "(ensure_weight_tying): the delta is applied once, to the shared weight."
                    )
        all_shared = in_shared + out_shared
        in_name = self.input_name
        out_name = self.output_name or f"{self.arch.output_embedding}.weight"
        source = self.base.tensors[in_name]
        out_steps_keys = [key for e in out_steps for key in _step_keys(e[1])]
        if not in_only and not out_only:
            self.targets[in_name] = _Target(in_name, source, list(all_shared))
            if self.output_name:  # the checkpoint also stores the tied copy: keep it identical
                self.targets[self.output_name] = _Target(
                    self.output_name, source, list(all_shared), note=f"tied copy of {in_name}"
                )
            for key in out_steps_keys:
                self.accounting[key] = in_name
            return {}
        self.targets[in_name] = _Target(in_name, source, all_shared + in_only)
        self.targets[out_name] = _Target(out_name, source, all_shared + out_only, note=f"untied from {in_name}")
        for key in out_steps_keys:
            self.accounting[key] = out_name
        changed = [n for n, steps in ((in_name, in_only), (out_name, out_only)) if steps]
        self.notes.append(
            f"Untied the embeddings: the base ties `{out_name}` to `{in_name}`, but the adapter changes "
            f"{' and '.join(f'`{n}`' for n in changed)} on its own, so the merged model stores both and "
            "sets tie_word_embeddings=false (as base + adapter behaves; merging into the shared weight "
            "would change the other side too)."
        )
        return {"tie_word_embeddings": False}

    # -- validation and layouts

    def layout_for(self, name: str, w: tuple[int, ...], mod: LoraModule) -> Layout:
        a, b = mod.a.shape, mod.b.shape
        where = f"`{name}`"
        if mod.param != "weight":
            return self._parameter_layout(where, w, mod)
        if mod.layer == "embedding":
            if len(w) == 2 and w == (a[1], b[0]):
                return "embedding"
            self._shape_error(where, w, f"(lora_embedding_B {list(b)} @ lora_embedding_A {list(a)})ᵀ", (a[1], b[0]))
        if len(w) >= 3:
            if len(a) == len(w) and a[1] != w[1] and a[2:] == w[2:] and b[0] == w[0] and a[1] % w[1] == 0:
                raise UnsupportedError(
                    f"{where} is a grouped convolution ({a[1] // w[1]} groups): PEFT cannot merge a LoRA into "
                    "grouped convolutions, and neither can loraship.",
                    fix="Keep this adapter unmerged, or train it without LoRA on grouped convolutions.",
                )
            if len(a) == len(w) and b[0] == w[0] and a[1:] == w[1:]:
                return "conv"
            self._shape_error(where, w, f"lora_B {list(b)} ∘ lora_A {list(a)}", (b[0], *a[1:]))
        if len(w) != 2 or len(a) != 2 or len(b) != 2:
            self._shape_error(where, w, f"lora_B {list(b)} @ lora_A {list(a)}", (b[0], a[-1]))
        linear_fits = w == (b[0], a[1])
        conv1d_fits = w == (a[1], b[0])
        is_conv1d_layer = self.model_type in CONV1D_MODEL_TYPES and mod.module.rpartition(".")[2] in CONV1D_LAYER_NAMES
        if linear_fits and conv1d_fits:
            layout: Layout = "conv1d" if is_conv1d_layer else "linear"
        elif linear_fits:
            layout = "linear"
        elif conv1d_fits:
            layout = "conv1d"
        else:
            self._shape_error(where, w, f"lora_B {list(b)} @ lora_A {list(a)}", (b[0], a[1]))
        configured = self.adapter.fan_in_fan_out
        if configured != (layout == "conv1d"):
            note = (
                f"adapter_config.json sets fan_in_fan_out={str(configured).lower()}, but `{name}` is "
                f"stored as {'(in, out) (a Conv1D layer)' if layout == 'conv1d' else '(out, in) (an nn.Linear)'}:"
                f" merged as fan_in_fan_out={str(layout == 'conv1d').lower()}, as PEFT does."
            )
            if note not in self.notes:
                self.notes.append(note)
        return layout

    def _parameter_layout(self, where: str, w: tuple[int, ...], mod: LoraModule) -> Layout:
        """A LoRA on a raw parameter (``target_parameters``): 2-D, or 3-D stacked experts."""
        a, b = mod.a.shape, mod.b.shape
        in_f, out_f = a[-1], b[0]
        if len(w) == 2 and mod.experts == 1 and w == (out_f, in_f):
            return "parameter"
        if len(w) == 3 and mod.experts == w[0]:
            standard, transposed = w == (w[0], out_f, in_f), w == (w[0], in_f, out_f)
            if standard and transposed:
                return "experts_transposed" if mod.module in self.arch.transposed_experts else "experts"
            if standard or transposed:
                return "experts" if standard else "experts_transposed"
        self._shape_error(where, w, f"{mod.experts} expert(s) of lora_B {list(b)} @ lora_A {list(a)}")
        raise AssertionError  # pragma: no cover - _shape_error raises

    def _shape_error(
        self, where: str, base_shape: tuple[int, ...], made: str, result: tuple[int, ...] | None = None
    ) -> None:
        makes = f" makes {list(result)}" if result is not None else " does not fit it"
        raise IncompatibleError(
            f"Shape mismatch for {where}: the base tensor is {list(base_shape)} but the adapter's {made}{makes}.",
            fix="Use the base model the adapter was trained on" + self._trained_on() + ".",
        )

    # -- output

    def build(self, dtype: str | None) -> MergePlan:
        self.collect()
        self.check_unmatched()
        config_updates: dict[str, Any] = {}
        config_updates.update(self.resolve_tying())
        out_code = DTYPE_NAMES[dtype] if dtype else None
        default_float = out_code or self._main_float_dtype()
        order = {name: i for i, name in enumerate(self.base.tensors)}
        plans: dict[str, TensorPlan] = {}
        new_vocab: dict[str, int] = {}
        for name, target in self.targets.items():
            plans[name] = self._tensor_plan(target, out_code, default_float, new_vocab)
        self._check_vocab(new_vocab, config_updates)
        tensors: list[TensorPlan] = []
        for name, info in self.base.tensors.items():
            if name in plans:
                tensors.append(plans[name])
            else:
                code = out_code if (out_code and info.dtype in FLOAT_CODES) else info.dtype
                tensors.append(TensorPlan(name, info.shape, code, info))
        tensors.extend(p for n, p in plans.items() if n not in order)
        if dtype:
            config_updates["dtype"] = dtype
        if any(t.source is None for t in tensors):
            config_updates.update(self._head_config(tensors))
        self._check_accounting()
        return MergePlan(
            tensors=tuple(tensors),
            config_updates=config_updates,
            accounting=dict(self.accounting),
            notes=tuple(self.notes),
            adapter=self.adapter,
        )

    def _tensor_plan(
        self, target: _Target, out_code: str | None, default_float: str, new_vocab: dict[str, int]
    ) -> TensorPlan:
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
                if shape is not None and new_shape != shape:
                    if self._is_embedding(target.name, shape) and new_shape[1:] == shape[1:]:
                        new_vocab[target.name] = new_shape[0]
                    else:
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
            if isinstance(step, LoraStep):
                layout = self.layout_for(target.name, shape, step.module)
                if step.dora and layout in ("parameter", "experts", "experts_transposed"):
                    raise UnsupportedError(f"DoRA on expert parameters (`{target.name}`) is not supported.")
                self._check_float(target, source)
                resolved.append(LoraStep(step.module, layout))
            elif isinstance(step, LoraBiasStep):
                if source is not None and source.shape != step.module.bias.shape:  # type: ignore[union-attr]
                    self._shape_error(f"`{target.name}`", source.shape, f"lora_B.bias {list(step.module.bias.shape)}")  # type: ignore[union-attr]
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
        return TensorPlan(target.name, tuple(shape), code, source, tuple(resolved), target.note)

    def _check_float(self, target: _Target, source: TensorInfo | None) -> None:
        if source is not None and source.dtype not in FLOAT_CODES:
            raise BaseModelError(
                f"`{target.name}` in the base model `{self.base_label}` is stored as {source.dtype}, not as a "
                "floating-point tensor: it is quantized, and a LoRA delta cannot be merged into it.",
                fix="Merge into the full-precision model this one was quantized from: pass it with --base "
                "(in loraship.yaml: `base:`).",
            )

    def _embedding_names(self) -> set[str]:
        names = {n for n in (self.input_name, self.output_name) if n}
        if self.arch.tied and self.arch.output_embedding:
            names.add(self.output_name or f"{self.arch.output_embedding}.weight")
        return names

    def _is_embedding(self, name: str, shape: tuple[int, ...]) -> bool:
        known = self._embedding_names()
        if known:
            return name in known
        vocab = vocab_size(self.config)  # no architecture information: go by the vocabulary size
        return len(shape) == 2 and vocab is not None and shape[0] == vocab

    def _check_vocab(self, new_vocab: Mapping[str, int], updates: dict[str, Any]) -> None:
        if not new_vocab:
            return
        old = vocab_size(self.config)
        sizes = set(new_vocab.values())
        tied_out = self.output_name or (f"{self.arch.output_embedding}.weight" if self.arch.output_embedding else None)
        behind = sorted(
            n for n in self._embedding_names()
            if n not in new_vocab and not (self.arch.tied and n == tied_out and n not in self.targets)
        )  # fmt: skip
        if len(sizes) > 1 or behind:
            desc = ", ".join(f"`{n}` to {v} rows" for n, v in new_vocab.items())
            left = f"; {', '.join(f'`{n}`' for n in behind)} stays at {old} rows" if behind else ""
            raise IncompatibleError(
                f"The adapter resizes the vocabulary inconsistently: it saves {desc}{left}.",
                fix="Save the adapter with both embeddings (modules_to_save=['embed_tokens', 'lm_head'] or "
                "save_embedding_layers=True) after resize_token_embeddings().",
            )
        (size,) = sizes
        updates["vocab_size"] = size
        self.notes.append(f"The adapter resizes the vocabulary from {old} to {size} tokens: config.json follows.")

    def _head_config(self, tensors: list[TensorPlan]) -> dict[str, Any]:
        """The adapter brings a head the base lacks: config.json names the head's class and labels."""
        updates: dict[str, Any] = {}
        archs = list(self.config.get("architectures") or [])
        task = str(self.adapter.config.get("task_type") or "")
        trained = self.adapter.base_model_class or _head_class(archs, task)
        new = ", ".join(t.name for t in tensors if t.source is None)
        if trained and archs != [trained]:
            updates["architectures"] = [trained]
            self.notes.append(f"The adapter adds a head the base lacks ({new}): architectures becomes {trained}.")
        if task in ("SEQ_CLS", "TOKEN_CLS"):
            heads = [t for t in tensors if t.source is None and t.name.endswith(".weight") and len(t.shape) == 2]
            if heads:
                labels = heads[-1].shape[0]
                id2label = self.config.get("id2label")
                if not isinstance(id2label, dict) or len(id2label) != labels:
                    updates["id2label"] = {str(i): f"LABEL_{i}" for i in range(labels)}
                    updates["label2id"] = {f"LABEL_{i}": i for i in range(labels)}
        return updates

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


def _step_keys(step: Step) -> list[str]:
    if isinstance(step, ReplaceStep):
        return [step.tensor.name]
    if isinstance(step, LoraStep):
        m = step.module
        return [m.a.name, m.b.name] + ([m.magnitude.name] if m.magnitude else [])
    if isinstance(step, LoraBiasStep):
        return [step.module.bias.name] if step.module.bias else []
    return [step.update.tensor.name]


_TASK_HEADS = {
    "SEQ_CLS": "ForSequenceClassification",
    "TOKEN_CLS": "ForTokenClassification",
    "QUESTION_ANS": "ForQuestionAnswering",
}


def _head_class(architectures: list[str], task: str) -> str | None:
    """``LlamaForCausalLM`` + ``SEQ_CLS`` -> ``LlamaForSequenceClassification``."""
    suffix = _TASK_HEADS.get(task)
    if not suffix or not architectures:
        return None
    arch = str(architectures[0])
    for marker in ("For", "LMHeadModel", "Model"):
        if marker in arch:
            return arch[: arch.index(marker)] + suffix
    return None


def vocab_size(config: Mapping[str, Any]) -> int | None:
    """config.json's vocabulary size (or its text model's, for multimodal configs)."""
    value = config.get("vocab_size")
    if value is None and isinstance(config.get("text_config"), dict):
        value = config["text_config"].get("vocab_size")
    return int(value) if isinstance(value, int) else None
