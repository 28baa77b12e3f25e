"""Which layout a LoRA delta takes in the tensor it lands in, from shapes alone.

``nn.Linear`` stores (out, in), transformers' ``Conv1D`` (in, out) (PEFT then forces
``fan_in_fan_out``), ``ConvNd`` (out, in, *kernel), ``nn.Embedding`` (vocab, dim) with the delta
transposed; a raw parameter (``target_parameters``) is 2-D or stacked experts (experts, out, in) or
(experts, in, out). A LoRA whose shapes fit no layout is a shape mismatch, said in words.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal, NoReturn

from loraship.engine.adapter import LoraModule
from loraship.engine.conversions import ExpertPart, FusedParam
from loraship.errors import IncompatibleError, UnsupportedError

Layout = Literal["linear", "conv1d", "conv", "embedding", "parameter", "experts", "experts_transposed"]

#: Model types whose attention/MLP projections are transformers' ``Conv1D`` (weights stored
#: (in, out)); PEFT forces ``fan_in_fan_out=True`` for those layers and False for ``nn.Linear``.
CONV1D_MODEL_TYPES = frozenset(
    {"gpt2", "openai-gpt", "imagegpt", "decision_transformer", "clvp", "clvp_encoder", "clvp_decoder"}
)
CONV1D_LAYER_NAMES = frozenset({"c_attn", "c_proj", "c_fc", "q_attn"})


@dataclass(frozen=True)
class Layouts:
    """Layouts for one base and adapter.

    Attributes:
        model_type: config.json's ``model_type`` (Conv1D models).
        fan_in_fan_out: The adapter's setting (a mismatch is noted, merged as PEFT merges it).
        transposed_experts: Expert modules whose square 3-D parameters are stored (experts, in, out).
        trained_on: `` (adapter_config.json names `x`)`` for messages.
        note: Receives notes for the plan.
    """

    model_type: str
    fan_in_fan_out: bool
    transposed_experts: frozenset[str]
    trained_on: str
    note: Callable[[str], None]

    def conv1d(self, module: str) -> bool:
        """Whether ``module`` is a transformers Conv1D layer (weight stored (in, out))."""
        return self.model_type in CONV1D_MODEL_TYPES and module.rpartition(".")[2] in CONV1D_LAYER_NAMES

    def layer(self, name: str, w: tuple[int, ...], mod: LoraModule) -> Layout:
        a, b = mod.a.shape, mod.b.shape
        where = f"`{name}`"
        if mod.wraps_parameter:
            return self.parameter(where, w, mod)
        if mod.layer == "embedding":
            if len(w) == 2 and w == (a[1], b[0]):
                return "embedding"
            self.shape_error(where, w, f"(lora_embedding_B {list(b)} @ lora_embedding_A {list(a)})ᵀ", (a[1], b[0]))
        if len(w) >= 3:
            if len(a) == len(w) and a[1] != w[1] and a[2:] == w[2:] and b[0] == w[0] and a[1] % w[1] == 0:
                raise UnsupportedError(
                    f"{where} is a grouped convolution ({a[1] // w[1]} groups): PEFT cannot merge a LoRA into "
                    "grouped convolutions, and neither can loraship.",
                    fix="Keep this adapter unmerged, or train it without LoRA on grouped convolutions.",
                )
            if len(a) == len(w) and b[0] == w[0] and a[1:] == w[1:]:
                return "conv"
            self.shape_error(where, w, f"lora_B {list(b)} ∘ lora_A {list(a)}", (b[0], *a[1:]))
        if len(w) != 2 or len(a) != 2 or len(b) != 2:
            self.shape_error(where, w, f"lora_B {list(b)} @ lora_A {list(a)}", (b[0], a[-1]))
        linear_fits = w == (b[0], a[1])
        conv1d_fits = w == (a[1], b[0])
        is_conv1d_layer = self.conv1d(mod.module)
        if linear_fits and conv1d_fits:
            layout: Layout = "conv1d" if is_conv1d_layer else "linear"
        elif linear_fits:
            layout = "linear"
        elif conv1d_fits:
            layout = "conv1d"
        else:
            self.shape_error(where, w, f"lora_B {list(b)} @ lora_A {list(a)}", (b[0], a[1]))
        if self.fan_in_fan_out != (layout == "conv1d"):
            self.note(
                f"adapter_config.json sets fan_in_fan_out={str(self.fan_in_fan_out).lower()}, but `{name}` is "
                f"stored as {'(in, out) (a Conv1D layer)' if layout == 'conv1d' else '(out, in) (an nn.Linear)'}:"
                f" merged as fan_in_fan_out={str(layout == 'conv1d').lower()}, as PEFT does."
            )
        return layout

    def parameter(self, where: str, w: tuple[int, ...], mod: LoraModule) -> Layout:
        """A LoRA on a raw parameter (``target_parameters``): 2-D, or 3-D stacked experts."""
        a, b = mod.a.shape, mod.b.shape
        in_f, out_f = a[-1], b[0]
        if len(w) == 2 and mod.experts == 1 and w == (out_f, in_f):
            return "parameter"
        if len(w) == 3 and mod.experts == w[0]:
            standard, transposed = w == (w[0], out_f, in_f), w == (w[0], in_f, out_f)
            if standard and transposed:
                return "experts_transposed" if mod.module in self.transposed_experts else "experts"
            if standard or transposed:
                return "experts" if standard else "experts_transposed"
        self.shape_error(where, w, f"{mod.experts} expert(s) of lora_B {list(b)} @ lora_A {list(a)}")

    def shape_error(
        self, where: str, base_shape: tuple[int, ...], made: str, result: tuple[int, ...] | None = None
    ) -> NoReturn:
        makes = f" makes {list(result)}" if result is not None else " does not fit it"
        raise IncompatibleError(
            f"Shape mismatch for {where}: the base tensor is {list(base_shape)} but the adapter's {made}{makes}.",
            fix="Use the base model the adapter was trained on" + self.trained_on + ".",
        )


def place_fused(
    fused: FusedParam, mod: LoraModule, shapes: Mapping[str, tuple[int, ...]], layouts: Layouts, trained_on: str
) -> list[tuple[str, Layout, ExpertPart | None]]:
    """Where a LoRA on a parameter transformers fuses on load lands: each stored tensor, with the
    layout of the fused parameter and the tensor's part of one expert's slice (None: all of it).

    Raises:
        UnsupportedError: loraship cannot invert the conversion.
        IncompatibleError: The stored tensors do not fit the LoRA or each other.
    """
    where = f"`{fused.param}`"
    if fused.refusal is not None:
        raise UnsupportedError(
            f"The adapter targets {where}, which transformers builds on load from per-expert tensors with "
            f"{fused.refusal}: loraship cannot carry a LoRA delta back through that conversion.",
            fix="Merge this adapter with PEFT (PeftModel.from_pretrained(base, adapter).merge_and_unload(), then "
            "save_pretrained()), and check the result with `loraship verify`.",
        )
    if fused.transpose is not None:  # stored whole, maybe transposed: one step on the stored tensor
        key, shape = fused.sources[0][0], fused.transpose[0]
        stored, swapped = shapes[key], (shape[0], shape[2], shape[1])
        layout = layouts.parameter(where, shape, mod)
        if fused.stored_transposed(stored):
            if stored != swapped:
                layouts.shape_error(f"`{key}`", stored, f"transposed {where}", swapped)
            layout = "experts" if layout == "experts_transposed" else "experts_transposed"
        elif stored != shape:
            layouts.shape_error(f"`{key}`", stored, f"{where}", shape)
        return [(key, layout, None)]
    try:
        slice_shape, placed = fused.layout(shapes)
    except ValueError as e:
        raise IncompatibleError(
            f"The base checkpoint's per-expert tensors of {where} do not fit together: {e}.",
            fix="Use an unmodified copy of the base model" + trained_on + ".",
        ) from e
    layout = layouts.parameter(where, (fused.experts, *slice_shape), mod)
    return [(key, layout, part) for key, part in placed]
