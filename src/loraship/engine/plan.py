"""A merge plan: what each output tensor of the merged model becomes. Data only.

A :class:`MergePlan` is a list of :class:`TensorPlan`: each output tensor with the base tensor it
starts from and the steps applied to it (replace by a trained copy, add a LoRA delta, DoRA, a LoRA
bias, replace rows, new block scales). :mod:`loraship.engine.planner` computes it from tensor
headers; :mod:`loraship.engine.merge` carries it out; the checks read it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from loraship.engine.adapter import AdapterSpec, LoraModule, TokenUpdate
from loraship.engine.conversions import ExpertPart, Piece
from loraship.engine.layouts import Layout
from loraship.engine.safetensors_io import TensorInfo, nbytes_of
from loraship.methods.base import MethodModule, method_of


@dataclass(frozen=True)
class Requantize:
    """How a merged weight is quantized again (``--requantize``), as transformers' ``Fp8Quantize`` does.

    Attributes:
        via: The dtype code the weight is dequantized to and merged in.
        block: The (rows, columns) block of one scale: the base's.
        scales: The output name of the new scales, written right after the weight.
        scales_code: Their dtype code: the base's.
        ue8m0: Scales are powers of two (``scale_fmt: ue8m0``).
    """

    via: str
    block: tuple[int, int]
    scales: str
    scales_code: str
    ue8m0: bool = False


# --------------------------------------------------------------------------- steps


@dataclass(frozen=True)
class ReplaceStep:
    """The tensor takes the values of a trained copy saved in the adapter (cast to its dtype)."""

    tensor: TensorInfo
    origin: str


@dataclass(frozen=True)
class LoraStep:
    """Add the module's LoRA delta (DoRA when it has a magnitude vector).

    ``part``: the tensor is one expert's part of a parameter transformers fuses on load; the delta
    is that expert's slice of the fused parameter's delta, cut to the part.
    ``piece``: the LoRA's parameter and the tensor overlap (transformers cuts or joins them on load): the
    delta fills rows of the tensor, or the tensor takes rows of the delta.
    """

    module: LoraModule
    layout: Layout
    part: ExpertPart | None = None
    piece: Piece | None = None

    @property
    def dora(self) -> bool:
        return self.module.magnitude is not None


@dataclass(frozen=True)
class MethodStep:
    """Apply a module of a PEFT method other than LoRA (:mod:`loraship.methods`) to one of its parameters.

    ``fan_in_fan_out``: the layer stores its weight (in, out) (transformers' Conv1D).
    """

    module: MethodModule
    param: str = "weight"
    fan_in_fan_out: bool = False

    def describe(self) -> str:
        method = method_of(self.module.method)
        text = method.describe(self.module) if method is not None else self.module.method
        return text if self.param == "weight" else f"{text} (bias)"


@dataclass(frozen=True)
class LoraBiasStep:
    """``lora_bias=True``: add ``scale · lora_B.bias`` to the module's bias."""

    module: LoraModule


@dataclass(frozen=True)
class TokenRowsStep:
    """``trainable_token_indices``: replace rows of an embedding."""

    update: TokenUpdate


@dataclass(frozen=True)
class ScalesStep:
    """The block scales of ``weight``, requantized: computed with that weight, written after it."""

    weight: str


def describe_piece(p: Piece) -> str:
    """``of self_attn.q_proj into [0:32]`` or ``of mlp.gate_up_proj [0:24]``."""
    short = ".".join(p.param.removesuffix(".weight").split(".")[-2:])
    return f"of {short} {'into ' if p.into else ''}[{p.start}:{p.start + p.length}]"


Step = ReplaceStep | LoraStep | MethodStep | LoraBiasStep | TokenRowsStep | ScalesStep


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
        scale: For a quantized base tensor: its scale tensor; the source is dequantized with it first.
        requantize: Quantize the merged value again (``--requantize``): how; ``dtype`` is then the
            quantized dtype, and the merge runs in ``requantize.via``.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    source: TensorInfo | None
    steps: tuple[Step, ...] = ()
    note: str | None = None
    scale: TensorInfo | None = None
    requantize: Requantize | None = None

    @property
    def changed(self) -> bool:
        return bool(self.steps) or self.source is None or self.source.dtype != self.dtype

    @property
    def copies_bytes(self) -> bool:
        """The base bytes go to the output as they are (no decoding)."""
        return not self.steps and self.source is not None and self.source.dtype == self.dtype and self.scale is None

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
                if step.part is not None:
                    p = step.part
                    layout = f" expert {p.expert} of {p.fused} [{p.start}:{p.start + p.length}]"
                elif step.piece is not None:
                    layout = " " + describe_piece(step.piece)
                parts.append(f"{kind}{layout} r={m.rank} scale={m.scale:g}")
            elif isinstance(step, MethodStep):
                parts.append(step.describe())
            elif isinstance(step, LoraBiasStep):
                parts.append(f"+ lora bias scale={step.module.scale:g}")
            elif isinstance(step, ScalesStep):
                parts.append("new block scales of the requantized weight")
            else:
                parts.append(f"replace {len(step.update.indices)} token rows")
        if self.requantize is not None and self.source is not None:
            parts.insert(0, f"dequantize {self.source.dtype} -> {self.requantize.via}")
            parts.append(f"quantize -> {self.dtype} ({self.requantize.block[0]}x{self.requantize.block[1]} blocks)")
        elif self.scale is not None and self.source is not None:
            parts.insert(0, f"dequantize {self.source.dtype} -> {self.dtype}")
        elif self.source is not None and self.source.dtype != self.dtype:
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
