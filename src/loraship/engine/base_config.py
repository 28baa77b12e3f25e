"""A base model's config.json, checked against itself and its checkpoint before transformers builds anything.

An adapter names its base (``base_model_name_or_path``), so the author of an adapter also chooses
which config.json loraship reads. transformers builds the model class from it on the meta device:
sizes that are not whole numbers, a dtype that is not one, or a layer count far beyond what the
checkpoint holds (``num_hidden_layers: 10**12`` builds modules until memory runs out) must be
refused first, naming the field. Pure: config dict + tensor names in.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from loraship.errors import BaseModelError

#: Sizes transformers builds modules from: a whole number from 1.
_SIZES = frozenset({
    "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "vocab_size", "head_dim",
    "max_position_embeddings", "n_embd", "n_head", "n_inner", "n_positions", "n_ctx", "d_model", "d_ff", "d_kv",
    "num_heads", "encoder_attention_heads", "decoder_attention_heads", "encoder_ffn_dim", "decoder_ffn_dim",
    "ffn_dim", "moe_intermediate_size", "shared_expert_intermediate_size", "embedding_size", "kv_lora_rank",
    "q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
})  # fmt: skip
#: Sizes of tensor dimensions (not positions, not head counts): at most a few times the checkpoint's largest one.
_WIDTHS = _SIZES - {
    "max_position_embeddings", "n_positions", "n_ctx", "num_attention_heads", "num_key_value_heads", "n_head",
    "num_heads", "encoder_attention_heads", "decoder_attention_heads",
}  # fmt: skip
#: How much larger than any stored dimension a width may be (a size used by a part the checkpoint lacks).
_WIDTH_SLACK = 16
#: Layer counts: a whole number from 0, and no more layers than the checkpoint holds.
_LAYERS = frozenset({
    "num_hidden_layers", "n_layer", "num_layers", "num_decoder_layers", "encoder_layers", "decoder_layers",
})  # fmt: skip
#: Expert counts: a whole number from 0, and no more experts than the checkpoint's tensors can hold.
_COUNTS = frozenset({"num_experts", "num_local_experts", "n_routed_experts", "n_shared_experts",
                     "num_experts_per_tok"})  # fmt: skip
#: torch dtype names config.json may give (``dtype``, formerly ``torch_dtype``).
DTYPES = frozenset({
    "float32", "float16", "bfloat16", "float64", "float", "half", "double", "float8_e4m3fn", "float8_e5m2",
    "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu", "float4_e2m1fn_x2", "int8", "uint8", "int16",
    "int32", "int64", "bool", "complex64", "complex128", "auto",
})  # fmt: skip
#: Module list names whose next path segment is a layer number (``model.layers.3.``, ``h.3.``, ``block.3.``).
_LAYER_LIST = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")
_NUMBER = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")
_EXPERT = re.compile(r"(?:^|\.)experts?\.(\d+)(?:\.|$)")


def check_base_config(config: Any, path: Path, tensor_names: Iterable[str] | None) -> None:
    """Refuse a base config.json that is not an object, has sizes or a dtype transformers cannot build
    a model from, or more layers or experts than the checkpoint's tensors (``tensor_names``, or a mapping of
    names to headers with shapes; None: not read yet) are for.

    Raises:
        BaseModelError: Naming the file and the field.
    """
    if not isinstance(config, dict):
        raise BaseModelError(
            f"`{path}` holds a JSON {_json_kind(config)}, not an object: it is not a transformers config.json.",
            fix="Download the base model again.",
        )
    names = list(tensor_names) if tensor_names is not None else None
    shapes = (
        [tuple(getattr(v, "shape", ())) for v in tensor_names.values()] if isinstance(tensor_names, Mapping) else []
    )
    layers: int | None = None
    experts: int | None = None
    for field, key, value in _fields(config):
        if isinstance(value, float) and not math.isfinite(value):
            raise _bad(path, field, value, "a finite number")
        if key in ("dtype", "torch_dtype") and value is not None:
            if not isinstance(value, str) or value.removeprefix("torch.") not in DTYPES:
                raise _bad(path, field, value, "a torch dtype name such as `bfloat16` or `float32`")
        elif key in _SIZES and value is not None and not _whole(value, 1):
            if not (isinstance(value, list) and value and all(_whole(v, 1) for v in value)):
                raise _bad(path, field, value, "a whole number from 1")
        elif key in (_LAYERS | _COUNTS) and value is not None and not _whole(value, 0):
            raise _bad(path, field, value, "a whole number from 0")
        elif key in _LAYERS and isinstance(value, int) and names is not None:
            if layers is None:
                layers = _layers_held(names)
            # A model may run its stored layers more than once (HRM's cycles over one stack): refuse only counts no
            # reuse explains, which also bounds what building the model on the meta device takes.
            if value > max(_REUSE * layers, len(names)):
                raise BaseModelError(
                    f"`{path}` sets `{field}` to {value}, but its checkpoint holds tensors for "
                    + (f"{layers} layer{'s' if layers != 1 else ''} at most" if layers else "no numbered layer")
                    + ": config.json does not describe these weights.",
                    fix="Download the base model again, or pass the base the adapter was trained on.",
                )
        elif key in _WIDTHS and isinstance(value, int) and shapes and value > _WIDTH_SLACK * _largest(shapes):
            raise BaseModelError(
                f"`{path}` sets `{field}` to {value}, but no tensor of its checkpoint is larger than "
                f"{_largest(shapes)} along any dimension: config.json does not describe these weights.",
                fix="Download the base model again, or pass the base the adapter was trained on.",
            )
        elif key in _COUNTS and isinstance(value, int) and names is not None:
            if experts is None:
                experts = _experts_held(names, shapes)
            if value > experts:
                raise BaseModelError(
                    f"`{path}` sets `{field}` to {value}, but its checkpoint's tensors can hold {experts} experts at "
                    "most: config.json does not describe these weights.",
                    fix="Download the base model again, or pass the base the adapter was trained on.",
                )


def _largest(shapes: list[tuple[int, ...]]) -> int:
    return max((d for s in shapes for d in s), default=0)


def _experts_held(names: list[str], shapes: list[tuple[int, ...]]) -> int:
    """The most experts the checkpoint can be for: one past the largest expert number in a name
    (``experts.N``), or any tensor's largest dimension (fused experts stack them on one), or the
    tensor count; a generous bound, there to stop a config that would build modules without end."""
    numbered = [int(m.group(1)) + 1 for n in names for m in _EXPERT.finditer(n)]
    dims = [d for shape in shapes for d in shape]
    return max([len(names), *numbered, *dims])


#: How many times a model may apply its stored layers (HRM: 2 cycles x (3 + 1)).
_REUSE = 16


def _layers_held(names: list[str]) -> int:
    """The most layers the checkpoint's tensor names can be for: one past the largest layer number
    after a layer list's name (``layers.N``), else past any number in a name; at most the tensor count
    when no name is numbered (layers shared, as ALBERT's)."""
    listed = [int(m.group(1)) for n in names for m in _LAYER_LIST.finditer(n)]
    if listed:
        return max(listed) + 1
    numbered = [int(m.group(1)) for n in names for m in _NUMBER.finditer(n)]
    return max(max(numbered) + 1, len(names)) if numbered else len(names)


def _fields(config: Mapping[str, Any], prefix: str = "", depth: int = 0) -> Iterator[tuple[str, str, Any]]:
    """(dotted field, key, value) for every field, sub-configs (``text_config``) included."""
    for key, value in config.items():
        field = f"{prefix}{key}"
        yield field, str(key), value
        if isinstance(value, dict) and depth < 8:
            yield from _fields(value, f"{field}.", depth + 1)
        elif isinstance(value, list) and depth < 8:
            for i, item in enumerate(value[:1000]):
                if isinstance(item, float) and not math.isfinite(item):
                    yield f"{field}[{i}]", "", item
                elif isinstance(item, dict):
                    yield from _fields(item, f"{field}[{i}].", depth + 1)


def _whole(value: Any, low: int) -> bool:
    """A whole number from ``low``; ``1200.0`` counts (transformers' own MusicFlamingo config writes it so)."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _bad(path: Path, field: str, value: Any, expected: str) -> BaseModelError:
    shown = repr(value) if isinstance(value, float) and not math.isfinite(value) else _json(value)
    shown = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}.get(shown, shown)
    return BaseModelError(
        f"`{path}` sets `{field}` to {shown}, but transformers needs {expected} there.",
        fix="Download the base model again, or pass the base the adapter was trained on.",
    )


def _json(value: Any) -> str:
    import json

    try:
        shown = json.dumps(value)
    except (TypeError, ValueError):
        shown = repr(value)
    return shown if len(shown) <= 60 else shown[:57] + "..."


def _json_kind(value: Any) -> str:
    if isinstance(value, list):
        return "list"
    if isinstance(value, str):
        return "string"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    return "number"
