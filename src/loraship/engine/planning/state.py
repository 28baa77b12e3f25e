"""The planner's working state: its inputs, and what each phase adds to them. Pure.

Inputs: the base checkpoint's headers, its config.json, the adapter, transformers' view of the
model (or None) and the base's label for messages; from them, the name resolver, the fused expert
sources, the FP8 scales and the layouts. The phases fill in, in order: collect -> ``slots`` and
``direct`` (steps per model parameter / per stored tensor) and the ignored tensors' ``accounting``;
place -> ``targets``, ``unmatched``, the rest of ``accounting`` and ``config_updates``
(tie_word_embeddings); build -> the rest of ``config_updates``. ``notes`` gathers every phase's
notes in order; ``per_expert`` the transformers v4 expert tensors that name resolution met.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from loraship.engine import quantized
from loraship.engine.adapter import AdapterSpec
from loraship.engine.layouts import Layouts
from loraship.engine.model_map import ModelMap
from loraship.engine.plan import Step
from loraship.engine.planning.names import NameResolver
from loraship.engine.safetensors_io import Checkpoint, TensorInfo


@dataclass
class Target:
    """Steps collected for one base tensor (or one new / untied tensor)."""

    name: str
    source: TensorInfo | None
    steps: list[tuple[int, Step, str]] = field(default_factory=list)  # (order, step, adapter label)
    note: str | None = None


#: A collected step: (order, step, first adapter key, all its adapter keys).
Entry = tuple[int, Step, str, list[str]]


@dataclass(eq=False)
class PlanState:
    """What planning one merge knows so far; each phase reads it and adds its part."""

    base: Checkpoint
    config: Mapping[str, Any]
    adapter: AdapterSpec
    model: ModelMap | None
    base_label: str
    targets: dict[str, Target] = field(default_factory=dict)
    unmatched: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    accounting: dict[str, str] = field(default_factory=dict)
    config_updates: dict[str, Any] = field(default_factory=dict)
    # Steps per model parameter name (``model.embed_tokens.weight``), before they are placed.
    slots: dict[str, list[Entry]] = field(default_factory=dict)
    # Steps on checkpoint tensors named directly (the per-expert tensors of a fused parameter).
    direct: dict[str, list[Entry]] = field(default_factory=dict)
    # Per-expert tensors an adapter saved under transformers v4 names, as name resolution met them.
    per_expert: list[str] = field(default_factory=list)
    resolver: NameResolver = field(init=False)
    model_type: str = field(init=False)
    fused_sources: frozenset[str] = field(init=False)
    renamed_sources: frozenset[str] = field(init=False)  # checkpoint names transformers loads under another name
    scales: dict[str, TensorInfo] = field(init=False)  # FP8 weight -> its scale, dequantized on the way
    layouts: Layouts = field(init=False)

    def __post_init__(self) -> None:
        model = self.model
        self.resolver = NameResolver(self.base.tensors)
        self.model_type = str(self.config.get("model_type", ""))
        self.fused_sources = model.fused_sources if model is not None else frozenset()
        self.renamed_sources = model.renamed_sources if model is not None else frozenset()
        self.scales = quantized.scale_pairs(self.base, self.config)
        self.layouts = Layouts(
            self.model_type, self.adapter.fan_in_fan_out,
            model.transposed_experts if model is not None else frozenset(), self.trained_on(), self.note_once,
        )  # fmt: skip

    def resolve(self, param: str) -> str | None:
        """The base tensor a model parameter is loaded from, if the checkpoint stores it."""
        if self.model is not None:
            found = self.model.stored.get(param)
            if found is None and param in self.fused_sources:  # a transformers v4 adapter: per-expert LoRAs
                self.per_expert.append(param)
                return param
            if found is None and param in self.renamed_sources:  # a transformers v4 adapter: its names are the
                return param  # checkpoint's, which transformers renames on load (Mixtral's block_sparse_moe.gate)
            return found
        module, _, name = param.rpartition(".")
        return self.resolver.resolve(module, name)

    def note_once(self, note: str) -> None:
        if note not in self.notes:
            self.notes.append(note)

    def trained_on(self) -> str:
        name = self.adapter.base_model_name_or_path
        return f" (adapter_config.json names `{name}`)" if name else ""

    def embedding_sources(self) -> set[str]:
        """Base tensors the input and output embeddings are loaded from."""
        m = self.model
        if m is None:
            return set()
        params = [f"{e}.weight" for e in (m.input_embedding, m.output_embedding) if e]
        return {m.stored[p] for p in params if p in m.stored} | {m.saved_as[p] for p in params if p in m.saved_as}

    def is_embedding(self, target: Target, shape: tuple[int, ...]) -> bool:
        known = self.embedding_sources()
        if known:
            return target.name in known or (target.source is not None and target.source.name in known)
        vocab = vocab_size(self.config)  # no architecture information: go by the vocabulary size
        return len(shape) == 2 and vocab is not None and shape[0] == vocab


def vocab_size(config: Mapping[str, Any]) -> int | None:
    """config.json's vocabulary size (or its text model's, for multimodal configs)."""
    value = config.get("vocab_size")
    if value is None and isinstance(config.get("text_config"), dict):
        value = config["text_config"].get("vocab_size")
    return int(value) if isinstance(value, int) else None
