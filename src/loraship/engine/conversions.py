"""MoE experts that transformers fuses on load, carried back to the tensors the checkpoint stores.

transformers v5 builds one 3-D parameter per expert block (``experts.gate_up_proj``: experts ×
out × in) from per-expert checkpoint tensors (``experts.N.gate_proj.weight`` and
``experts.N.up_proj.weight``), and splits it again on save. Both directions are its own
conversion mapping (``get_model_conversion_mapping``): a ``WeightConverter`` whose operations stack
the experts (``MergeModulelist``) and, for several source patterns, concatenate them
(``Concatenate``). A LoRA on the fused parameter (PEFT ``target_parameters``) changes each expert's
slice; this module says which saved tensor holds which part of which expert's slice, so the merge
computes one expert's delta at a time and adds each part to its own tensor. The output keeps the
checkpoint's names and layout. Conversions built from other operations are named, not guessed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ExpertPart:
    """Where one saved per-expert tensor sits in one expert's slice of a fused parameter.

    Attributes:
        expert: The expert's index in the fused parameter (its first dimension).
        dim: The dimension of the expert's slice the part is cut along.
        start: First index of the part along ``dim``.
        length: Its size along ``dim``.
        fused: The fused parameter's short name (``experts.gate_up_proj``), for messages.
    """

    expert: int
    dim: int
    start: int
    length: int
    fused: str


@dataclass(frozen=True)
class FusedParam:
    """A model parameter transformers builds on load from per-expert checkpoint tensors.

    Attributes:
        param: The model parameter (``model.layers.0.mlp.experts.gate_up_proj``).
        parts: Short names of the per-expert tensors, in concatenation order (``gate_proj``, ``up_proj``).
        sources: ``sources[i][e]``: the checkpoint tensor of part ``i`` for expert ``e``.
        concat_dim: The dimension of one expert's slice the parts are concatenated along (None: one part).
        refusal: The conversion's operations, when loraship cannot carry a delta back through them.
        transpose: For a fused parameter stored whole but transposed (``Transpose(1, 2)``): the model's
            shape of it, and whether transformers transposes only when the stored shape differs.
    """

    param: str
    parts: tuple[str, ...]
    sources: tuple[tuple[str, ...], ...]
    concat_dim: int | None
    refusal: str | None = None
    transpose: tuple[tuple[int, ...], bool] | None = None

    def stored_transposed(self, stored: tuple[int, ...]) -> bool:
        """Whether the stored tensor holds the parameter with its last two dimensions swapped."""
        assert self.transpose is not None
        shape, check_dims = self.transpose
        return not (check_dims and stored == shape)

    @property
    def experts(self) -> int:
        return len(self.sources[0]) if self.sources else 0

    @property
    def short(self) -> str:
        return ".".join(self.param.split(".")[-2:])

    def describe(self) -> str:
        """``experts.gate_up_proj → 128 experts × gate_proj, up_proj``."""
        return f"{self.short} → {self.experts} experts × {', '.join(self.parts)}"

    def layout(self, shapes: Mapping[str, tuple[int, ...]]) -> tuple[tuple[int, ...], list[tuple[str, ExpertPart]]]:
        """One expert's slice shape, and each checkpoint tensor's part of it.

        Raises:
            ValueError: The checkpoint's per-expert shapes do not concatenate (what differs, in words).
        """
        slice_shape: tuple[int, ...] | None = None
        placed: list[tuple[str, ExpertPart]] = []
        for e in range(self.experts):
            pieces = [shapes[self.sources[i][e]] for i in range(len(self.parts))]
            dim = self.concat_dim if self.concat_dim is not None else 0
            first = pieces[0]
            if any(len(p) != len(first) or dim >= len(p) for p in pieces) or any(
                p[:dim] + p[dim + 1 :] != first[:dim] + first[dim + 1 :] for p in pieces
            ):
                raise ValueError(
                    f"expert {e}'s tensors {', '.join(f'{list(p)}' for p in pieces)} do not concatenate along "
                    f"dimension {dim}"
                )
            shape = (*first[:dim], sum(p[dim] for p in pieces), *first[dim + 1 :])
            if slice_shape is not None and shape != slice_shape:
                raise ValueError(f"expert {e}'s slice is {list(shape)}, expert 0's {list(slice_shape)}")
            slice_shape = shape
            start = 0
            for i, piece in enumerate(pieces):
                placed.append((self.sources[i][e], ExpertPart(e, dim, start, piece[dim], self.short)))
                start += piece[dim]
        assert slice_shape is not None
        return slice_shape, placed


@dataclass(frozen=True)
class Piece:
    """How a plain (expert-free) parameter and a stored tensor overlap along one dimension, where transformers
    cuts one stored tensor into several parameters on load (``Chunk``: HRM's ``gate_up_proj`` into ``gate_proj``
    and ``up_proj``, a vision tower's ``qkv`` into ``q_proj``, ``k_proj``, ``v_proj``) or joins several stored
    tensors into one parameter (``Concatenate``: MiniMax-M3-VL's shared experts' ``gate_proj`` and ``up_proj``
    into ``gate_up_proj``). A LoRA on the parameter then changes rows ``[start, start + length)`` of the stored
    tensor (``into``) or the stored tensor takes those rows of the LoRA's delta (not ``into``).

    Attributes:
        param: The model parameter the LoRA is on.
        shape: Its shape (the LoRA delta's).
        dim: The dimension of the cut.
        start: First index of the overlap along ``dim`` (in the stored tensor when ``into``, else in the delta).
        length: Its size along ``dim``.
        into: The delta fills part of the stored tensor (a split); otherwise the stored tensor is part of the delta.
    """

    param: str
    shape: tuple[int, ...]
    dim: int
    start: int
    length: int
    into: bool
    order: tuple[int, ...] | None = None
    """Where transformers also permutes the rows on load (``PermuteForRope``): the delta's rows in stored order."""
    transposed: bool = False
    """The stored tensor holds the parameter transposed (``Transpose`` of a 2-D tensor: ERGO's ``gate_kernel``)."""


@dataclass(frozen=True)
class ConversionRules:
    """transformers' checkpoint-key renamings and converters for one model class, as
    ``from_pretrained`` applies them, and the model's parameter shapes (meta device)."""

    renamings: tuple[Any, ...]
    converters: tuple[Any, ...]
    prefix: str
    shapes: Mapping[str, tuple[int, ...]]
    config: Any = None

    @classmethod
    def of(cls, model: Any) -> ConversionRules:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming

        mapping = get_model_conversion_mapping(model)
        return cls(
            renamings=tuple(t for t in mapping if isinstance(t, WeightRenaming)),
            converters=tuple(t for t in mapping if isinstance(t, WeightConverter)),
            prefix=model.base_model_prefix,
            shapes={k: tuple(v.shape) for k, v in model.state_dict().items()},
            config=model.config,
        )

    def rename(self, key: str, *, convert: bool = True) -> tuple[str, str | None]:
        """The model name of checkpoint ``key``, and the converter source pattern it matched (None: renamed only)."""
        from transformers.core_model_loading import rename_source_key

        meta = dict.fromkeys(self.shapes, True)
        renamings, converters = (list(self.renamings), list(self.converters)) if convert else ([], [])
        renamed, pattern = rename_source_key(key, renamings, converters, self.prefix, meta)
        return str(renamed), pattern


def fused_params(rules: ConversionRules, names: Iterable[str]) -> dict[str, FusedParam]:
    """The parameters transformers fuses from the checkpoint tensors ``names`` (``rules`` of the
    model class), with the per-expert tensors each is built from, in its order."""
    from transformers.core_model_loading import Concatenate, MergeModulelist, Transpose, dot_natural_key

    meta_shapes = rules.shapes
    found: dict[str, dict[int, list[str]]] = {}
    converter_of: dict[str, Any] = {}
    for key in names:
        target, pattern = rules.rename(key)
        if pattern is None:
            continue
        converter = next(c for c in rules.converters if pattern in c.source_patterns)
        found.setdefault(target, {}).setdefault(converter.source_patterns.index(pattern), []).append(key)
        converter_of[target] = converter
    fused: dict[str, FusedParam] = {}
    for target, by_pattern in found.items():
        converter = converter_of[target]
        patterns = list(converter.source_patterns)
        parts = tuple(p.split("*.", 1)[-1].removesuffix(".weight").strip(".") for p in patterns)
        sources = tuple(tuple(sorted(by_pattern.get(i, []), key=dot_natural_key)) for i in range(len(patterns)))
        ops = list(converter.operations)
        stacks = bool(ops) and isinstance(ops[0], MergeModulelist) and ops[0].dim == 0
        concat: int | None = None
        refusal = None
        transpose = None
        if len(ops) == 1 and isinstance(ops[0], Transpose) and len(patterns) == 1 and target in meta_shapes:
            shape = tuple(meta_shapes[target])
            if len(shape) == 3 and {ops[0].dim0, ops[0].dim1} == {1, 2}:
                transpose = (shape, bool(ops[0].check_dims))
            else:
                refusal = _describe_op(ops[0])
        elif stacks and len(ops) == 2 and isinstance(ops[1], Concatenate) and ops[1].dim >= 1:
            concat = ops[1].dim - 1
        elif transpose is None and not (stacks and len(ops) == 1 and len(patterns) == 1):
            refusal = " then ".join(_describe_op(op) for op in ops)
        counts = {len(s) for s in sources}
        if refusal is None and target not in meta_shapes:
            refusal = f"a target `{target}` the model does not have"
        elif refusal is None and (len(counts) != 1 or 0 in counts):
            refusal = "a different number of experts per part: " + ", ".join(
                f"{len(s)} × {p}" for s, p in zip(sources, parts, strict=True)
            )
        fused[target] = FusedParam(target, parts, sources, concat, refusal, transpose)
    return fused


def pieces(
    rules: ConversionRules, shapes: Mapping[str, tuple[int, ...]]
) -> tuple[dict[str, tuple[tuple[str, Piece], ...]], dict[str, str]]:
    """Model parameter -> the stored tensors it overlaps and how (:class:`Piece`), for the converters that cut
    one stored tensor into parts (``Chunk``) or join 2-D stored tensors (``Concatenate``), no experts involved;
    and parameter -> how it is built, for the cuts loraship cannot carry a delta back through (``Chunk`` then
    ``PermuteForRope``: Kimi-K2.5's vision ``wqkv``). ``shapes``: the checkpoint's tensor shapes."""
    from transformers import core_model_loading as cml
    from transformers.core_model_loading import Chunk, Concatenate, PermuteForRope, Transpose

    cutting = tuple(c for c in (Chunk, getattr(cml, "Split", None)) if c is not None)  # Split: transformers 5.24+

    joined: dict[str, dict[int, list[str]]] = {}
    converter_of: dict[str, Any] = {}
    out: dict[str, tuple[tuple[str, Piece], ...]] = {}
    refused: dict[str, str] = {}
    for key, shape in shapes.items():
        target, pattern = rules.rename(key)
        if pattern is None:
            continue
        converter = next(c for c in rules.converters if pattern in c.source_patterns)
        ops, sources, targets = list(converter.operations), list(converter.source_patterns), converter.target_patterns
        targets = [targets] if isinstance(targets, str) else list(targets)
        permute = ops[-1] if ops and isinstance(ops[-1], PermuteForRope) else None
        cuts = ops[:-1] if permute is not None else ops
        if len(ops) == 1 and isinstance(ops[0], Transpose) and len(sources) == len(targets) == 1 and len(shape) == 2:
            wanted = tuple(rules.shapes.get(target, ()))
            if {ops[0].dim0, ops[0].dim1} == {0, 1} and len(wanted) == 2:
                swapped = not (ops[0].check_dims and shape == wanted)
                if (shape[::-1] if swapped else shape) == wanted:
                    out[target] = ((key, Piece(target, wanted, 0, 0, shape[0], True, transposed=swapped)),)
            continue
        if len(sources) == 1 and len(cuts) <= 1 and all(isinstance(op, cutting) for op in cuts) and (cuts or permute):
            names = _targets(target, targets) if len(targets) > 1 else [target]
            dim = cuts[0].dim if cuts else 0
            if not names or any(n not in rules.shapes for n in names) or not 0 <= dim < len(shape):
                continue
            start = 0
            for name, pattern_out in zip(names, targets, strict=False):
                length = rules.shapes[name][dim]
                order = _rope_order(permute, pattern_out, length, rules.config) if permute is not None else None
                piece = Piece(name, tuple(rules.shapes[name]), dim, start, length, True, order)
                out[name] = ((key, piece),)
                start += length
            if start != shape[dim] or (permute is not None and dim != 0):
                for name in names:
                    del out[name]
        elif ops and isinstance(ops[0], cutting) and len(sources) == 1 and len(targets) > 1:
            how = f"`{key}` with " + " then ".join(_describe_op(op) for op in ops)
            refused.update(dict.fromkeys([target, *_targets(target, targets)], how))
        elif len(ops) == 1 and isinstance(ops[0], Concatenate) and len(sources) > 1 and len(targets) == 1:
            joined.setdefault(target, {}).setdefault(sources.index(pattern), []).append(key)
            converter_of[target] = converter
    for target, by_pattern in joined.items():
        dim = converter_of[target].operations[0].dim
        keys = [by_pattern.get(i, []) for i in range(len(converter_of[target].source_patterns))]
        if target not in rules.shapes or any(len(k) != 1 for k in keys) or len(rules.shapes[target]) != 2:
            continue
        whole, start, placed = tuple(rules.shapes[target]), 0, []
        for (key,) in keys:
            length = shapes[key][dim] if dim < len(shapes[key]) else 0
            placed.append((key, Piece(target, whole, dim, start, length, False)))
            start += length
        if start == whole[dim]:
            out[target] = tuple(placed)
    return out, refused


def _rope_order(op: Any, pattern: str, rows: int, config: Any) -> tuple[int, ...] | None:
    """The rows of a delta in stored order, where transformers permutes a stored tensor's rows for rotary on load
    (``PermuteForRope``, only for the layer names it lists): ``model[i] = stored[perm[i]]``, so the delta's row
    ``i`` belongs in stored row ``perm[i]``. None where the op leaves this part alone."""
    import torch

    names = getattr(op, "permute_layer_names", None)
    if names is not None and not any(name in pattern for name in names):
        return None
    perm = op._permute_for_rope(torch.arange(rows, dtype=torch.float64), config).long()
    return tuple(int(i) for i in torch.argsort(perm))


def _targets(renamed: str, patterns: list[str]) -> list[str]:
    """The parameter names a cut key becomes: ``renamed`` is the first (``...attn.q_proj.weight``), the others
    have the other target patterns in its place."""
    at = renamed.rfind(patterns[0])
    if at < 0:
        return []
    return [renamed[:at] + p + renamed[at + len(patterns[0]) :] for p in patterns]


def _describe_op(op: Any) -> str:
    dims = [f"{k}={getattr(op, k)}" for k in ("dim", "dim0", "dim1") if isinstance(getattr(op, k, None), int)]
    return f"{type(op).__name__}({', '.join(dims)})"


@dataclass(frozen=True)
class PerExpertLora:
    """A LoRA an adapter saved under transformers v4 names on one per-expert tensor, and that
    tensor's place in the parameter transformers v5 fuses it into (for checking PEFT's conversion)."""

    fused: str
    part: ExpertPart
    a: Any  # TensorInfo of lora_A
    b: Any  # TensorInfo of lora_B
    scale: float


def peft_conversion_problem(peft_model: Any, loras: Iterable[PerExpertLora], *, tolerance: float) -> str | None:
    """How PEFT's unmerged model of a transformers-v4 adapter differs from the adapter's own math.

    PEFT converts per-expert LoRAs into LoRAs on the fused parameters when it loads them; each
    expert's part of its delta must equal ``scale · B @ A`` of the saved per-expert LoRA. Returns the
    first difference in words (relative to the delta's size), or None when PEFT's conversion is right.
    """
    import torch

    from loraship.engine.adapter import PREFIX
    from loraship.engine.safetensors_io import TensorReader

    wrappers: dict[str, Any] = {}
    for name, module in peft_model.named_modules():
        param = getattr(module, "parameter_name", None)
        if param and name.startswith(PREFIX) and hasattr(module, "get_delta_weight"):
            owner = name[len(PREFIX) :]
            while owner.endswith(".base_layer"):
                owner = owner[: -len(".base_layer")]
            wrappers[f"{owner}.{param}"] = module
    reader = TensorReader()
    deltas: dict[str, Any] = {}
    worst = (0.0, "")
    for lora in loras:
        expected = (reader.read(lora.b).float() @ reader.read(lora.a).float()) * lora.scale
        wrapper = wrappers.get(lora.fused)
        if wrapper is None or "default" not in getattr(wrapper, "lora_A", {}):
            return f"PEFT loads no LoRA into `{lora.fused}` (the adapter's per-expert LoRAs of it are dropped)"
        if lora.fused not in deltas:
            with torch.no_grad():
                deltas[lora.fused] = wrapper.get_delta_weight("default").float().cpu()
        delta = deltas[lora.fused]
        p = lora.part
        got = delta[p.expert].narrow(p.dim, p.start, p.length)
        if got.shape != expected.shape and got.T.shape == expected.shape:
            got = got.T
        if got.shape != expected.shape:
            return f"PEFT's LoRA on `{lora.fused}` is {list(delta.shape)}, which does not hold the adapter's experts"
        size = expected.abs().max().item()
        diff = (got - expected).abs().max().item() / size if size > 0 else (got.abs().max().item())
        if diff > worst[0]:
            worst = (diff, f"expert {p.expert} of `{lora.fused}` [{p.start}:{p.start + p.length}]")
    if worst[0] > tolerance:
        return (
            f"PEFT's conversion of this transformers-v4 adapter changes the experts' deltas: {worst[1]} differs from "
            f"the adapter's own scale·B·A by {worst[0]:.2g} of its size"
        )
    return None


def per_expert_loras(
    fused: Mapping[str, FusedParam], shapes: Mapping[str, tuple[int, ...]], loras: Mapping[str, Any]
) -> list[PerExpertLora]:
    """The per-expert LoRAs ``loras`` (checkpoint tensor -> LoraModule) with their places in ``fused``."""
    out: list[PerExpertLora] = []
    for f in fused.values():
        if f.refusal is not None or f.transpose is not None or not any(k in loras for ks in f.sources for k in ks):
            continue
        _, placed = f.layout(shapes)
        out.extend(PerExpertLora(f.param, part, loras[k].a, loras[k].b, loras[k].scale) for k, part in placed
                   if k in loras)  # fmt: skip
    return out
