"""Quantized bases: which formats are dequantized while streaming, and how; the others are refused.

A LoRA delta cannot be added to quantized weights without losing most of it, so a quantized base
is merged in full precision: each quantized tensor is dequantized as it streams, exactly as
transformers dequantizes it on load (``FineGrainedFP8Config(dequantize=True)``), the LoRA is
merged into the result as PEFT merges it, and the output is written in 16 bits without
``quantization_config``. Supported: block-scaled FP8 (``quant_method: fp8``: a float8 ``weight``
with a float32 ``weight_scale_inv`` per block; DeepSeek-V3, Qwen3 FP8 releases) and MXFP4
(``quant_method: mxfp4``: GPT-OSS experts stored as packed FP4 ``*_blocks`` with E8M0 ``*_scales``
per 32 values, dequantized as ``Mxfp4Config(dequantize=True)`` does). Formats whose
dequantization loraship does not mirror bit for bit (bitsandbytes, GPTQ, AWQ...) are refused with
the 16-bit fix.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from loraship.engine.plan import MergePlan, Requantize, ScalesStep, TensorPlan
from loraship.engine.safetensors_io import CODE_NAMES, DTYPE_NAMES, Checkpoint, TensorInfo, torch_dtype
from loraship.errors import BaseModelError, InputError

#: quant_method values whose tensors loraship dequantizes (as transformers does) while streaming.
DEQUANTIZED = frozenset({"fp8", "mxfp4"})
#: Stored dtypes of FP8 weights.
FP8_CODES = frozenset({"F8_E4M3", "F8_E5M2"})


def quantization(config: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """config.json's ``quantization_config`` (or its text model's), if any."""
    quant = config.get("quantization_config")
    if quant is None and isinstance(config.get("text_config"), dict):
        quant = config["text_config"].get("quantization_config")
    if quant is None:
        return None
    return quant if isinstance(quant, dict) else {}


def method(config: Mapping[str, Any]) -> str | None:
    quant = quantization(config)
    return None if quant is None else str(quant.get("quant_method", "unknown method"))


@dataclass(frozen=True)
class PackedTensor(TensorInfo):
    """A parameter an MXFP4 checkpoint stores as packed blocks and scales: its name, dequantized
    dtype and shape stand in the checkpoint so names match; its bytes are ``blocks`` and ``scales``."""

    blocks: TensorInfo | None = None
    scales: TensorInfo | None = None


def packed_view(base: Checkpoint, config: Mapping[str, Any]) -> Checkpoint:
    """``base`` with each MXFP4 ``X_blocks`` / ``X_scales`` pair shown as the parameter ``X`` it
    dequantizes to (as transformers loads it: (experts, in, out), in the model's dtype)."""
    if method(config) != "mxfp4":
        return base
    code = output_code(config, None)
    tensors: dict[str, TensorInfo] = {}
    for name, info in base.tensors.items():
        stem = name.removesuffix("_blocks")
        scales = base.tensors.get(f"{stem}_scales")
        if name.endswith("_scales") and f"{name.removesuffix('_scales')}_blocks" in base.tensors:
            continue
        if stem == name or scales is None or info.dtype != "U8" or len(info.shape) != 4:
            tensors[name] = info
            continue
        experts, rows, groups, width = info.shape
        shape = (experts, groups * width * 2, rows)
        tensors[stem] = PackedTensor(stem, code, shape, info.file, info.offset, 0, blocks=info, scales=scales)
    return replace(base, tensors=tensors)


def output_code(config: Mapping[str, Any], out_code: str | None) -> str:
    """The dtype code a dequantized tensor is written in: ``--dtype``, else the config's, else BF16."""
    code = DTYPE_NAMES.get(str(config.get("dtype") or config.get("torch_dtype")), "BF16")
    return out_code or ("BF16" if code == "F64" else code)


#: The 16 values of an E2M1 (FP4) nibble, as transformers' ``FP4_VALUES``.
FP4_VALUES = (+0.0, +0.5, +1.0, +1.5, +2.0, +3.0, +4.0, +6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def dequantize_mxfp4(blocks: Any, scales: Any, dtype: Any) -> Any:
    """Packed FP4 blocks × 2^(scale − 127), in ``dtype``, transposed to (experts, in, out): the
    steps of transformers' ``convert_moe_packed_tensors``."""
    import torch

    exponents = scales.to(torch.int32) - 127
    lut = torch.tensor(FP4_VALUES, dtype=dtype)
    *prefix, groups, width = blocks.shape
    rows = 1
    for n in prefix:
        rows *= n
    packed = blocks.to(torch.uint8).reshape(rows * groups, width)
    out = torch.empty(rows * groups, width * 2, dtype=dtype)
    out[:, 0::2] = lut[(packed & 0x0F).to(torch.int)]
    out[:, 1::2] = lut[(packed >> 4).to(torch.int)]
    torch.ldexp(out, exponents.reshape(rows * groups, 1), out=out)
    return out.reshape(*prefix, groups * width * 2).transpose(1, 2).contiguous()


def check_base(config: Mapping[str, Any], *, where: str) -> None:
    """Refuse bases quantized in a format loraship does not dequantize.

    Raises:
        BaseModelError: The base is quantized in another format.
    """
    quant = quantization(config)
    if quant is None or quant.get("quant_method") in DEQUANTIZED:
        return
    bits = ""
    if quant.get("load_in_4bit"):
        bits = ", 4-bit"
    elif quant.get("load_in_8bit"):
        bits = ", 8-bit"
    elif quant.get("bits"):
        bits = f", {quant['bits']}-bit"
    raise BaseModelError(
        f"The base model `{where}` is quantized ({quant.get('quant_method', 'unknown method')}{bits}; config.json has "
        "a quantization_config): merging a LoRA delta into quantized weights loses most of it.",
        fix="Merge into the full-precision model this one was quantized from (its model card usually names it): pass "
        "it with --base (in loraship.yaml: `base:`). loraship dequantizes block-scaled FP8 and MXFP4 bases itself.",
    )


def scale_pairs(base: Checkpoint, config: Mapping[str, Any]) -> dict[str, TensorInfo]:
    """FP8 weight name -> its ``weight_scale_inv`` tensor, for a base loraship dequantizes."""
    if method(config) != "fp8":
        return {}
    pairs: dict[str, TensorInfo] = {}
    for name, info in base.tensors.items():
        scale = base.tensors.get(f"{name}_scale_inv")
        if info.dtype in FP8_CODES and scale is not None:
            pairs[name] = scale
    return pairs


def block_grid(weight: tuple[int, ...], scale: tuple[int, ...]) -> tuple[int, int]:
    """The (rows, columns) block of a scale grid, derived as transformers derives it.

    Raises:
        ValueError: The weight's shape is not a multiple of the grid (transformers refuses it too).
    """
    rows, cols = weight[-2:]
    grid = scale[-2:] if len(scale) >= 2 else (1, 1)
    if rows % grid[0] or cols % grid[1]:
        raise ValueError(f"weight {list(weight)} is not divisible by its scale grid {list(grid)}")
    return rows // grid[0], cols // grid[1]


def dequantize_fp8(quantized: Any, scales: Any, dtype: Any) -> Any:
    """``q · s`` per block in float32, rounded once to ``dtype`` (transformers' ``Fp8Dequantize``)."""
    import torch

    q = quantized.to(torch.float32)
    grid_rows, grid_cols = tuple(scales.shape[-2:]) if scales.dim() >= 2 else (1, 1)
    block_rows, block_cols = block_grid(tuple(q.shape), tuple(scales.shape))
    s = scales.to(torch.float32).reshape(-1, grid_rows, grid_cols).unsqueeze(-1).unsqueeze(2)
    blocks = q.reshape(-1, grid_rows, block_rows, grid_cols, block_cols)
    return (blocks * s).to(dtype).reshape(q.shape)


def quantize_fp8(value: Any, how: Requantize) -> tuple[Any, Any]:
    """``value`` quantized to float8_e4m3fn per block, and its ``weight_scale_inv``: the steps of
    transformers' ``Fp8Quantize`` (per-block max |x| → scale 448 / max, kept at 1 for zero blocks;
    with ue8m0 the inverse scale is rounded up to a power of two first)."""
    import torch

    fp8 = torch.float8_e4m3fn
    lo, hi = torch.finfo(fp8).min, torch.finfo(fp8).max
    *lead, rows, cols = value.shape
    block_rows, block_cols = how.block
    tiles = value.to(torch.float32).reshape(*lead, rows // block_rows, block_rows, cols // block_cols, block_cols)
    max_abs = tiles.abs().amax(dim=(-3, -1))
    scales = hi / torch.where(max_abs > 0, max_abs, torch.ones_like(max_abs))
    scales = torch.where(max_abs > 0, scales, torch.ones_like(scales))
    inverse = (1.0 / scales).to(torch.float32)
    if how.ue8m0:
        inverse = torch.pow(2.0, torch.ceil(torch.log2(inverse.clamp(min=torch.finfo(torch.float32).tiny))))
        scales = 1.0 / inverse
    q = torch.clamp(tiles * scales.unsqueeze(-1).unsqueeze(-3), min=lo, max=hi).to(fp8).reshape(value.shape)
    return q, inverse.to(torch_dtype(how.scales_code))


def check_requantizable(config: Mapping[str, Any], where: str, *, e4m3: bool = True) -> None:
    """Refuse ``--requantize`` for a base that is not block-scaled FP8 (from its config: before any
    weight is downloaded; ``e4m3``: its FP8 weights, once their headers are read, are float8_e4m3fn).

    Raises:
        InputError: The option does not apply to this base.
    """
    if method(config) == "fp8" and e4m3:
        return
    raise InputError(
        f"--requantize writes the merged weights back in the base's format; loraship requantizes block-scaled "
        f"FP8 (float8_e4m3fn) only, and the base model `{where}` is {describe(config) or 'not quantized'}.",
        fix="Drop --requantize (in loraship.yaml: `requantize: false`): the merged model is written in 16 bits.",
    )


def requantized(plan: MergePlan, config: Mapping[str, Any], where: str) -> MergePlan:
    """``plan`` (of a dequantized FP8 base) writing the base's format instead of 16 bits: weights the
    adapter does not change are copied with their scales byte for byte; changed ones are merged in
    16 bits and quantized again with the base's block size, their new scales written after them;
    config.json keeps its quantization_config.

    Raises:
        InputError: The base is not block-scaled FP8 (e4m3): the option does not apply.
    """
    quant = quantization(config) or {}
    fp8 = [t for t in plan.tensors if t.scale is not None and t.source is not None]
    check_requantizable(config, where, e4m3=all(t.source is not None and t.source.dtype == "F8_E4M3" for t in fp8))
    tensors: list[TensorPlan] = []
    requantized_count = 0
    for t in plan.tensors:
        source, scales = t.source, t.scale
        if source is None or scales is None:
            tensors.append(t)
        elif not t.steps:  # untouched: the base's bytes, and its scales
            tensors.append(replace(t, dtype=source.dtype, scale=None))
            tensors.append(replace(t, name=scales.name, shape=scales.shape, dtype=scales.dtype, source=scales,
                                   scale=None))  # fmt: skip
        else:
            how = Requantize(t.dtype, block_grid(source.shape, scales.shape), scales.name, scales.dtype,
                             ue8m0=quant.get("scale_fmt") == "ue8m0")  # fmt: skip
            tensors.append(replace(t, dtype=source.dtype, requantize=how))
            tensors.append(replace(t, name=scales.name, shape=scales.shape, dtype=scales.dtype, source=scales,
                                   steps=(ScalesStep(t.name),), scale=None, note=None))  # fmt: skip
            requantized_count += 1
    updates = {k: v for k, v in plan.config_updates.items() if k != "quantization_config"}
    note = (
        f"--requantize: the base is quantized ({describe(config)}): the adapter changes {requantized_count} of its "
        f"{len(fp8)} FP8 weights, which are dequantized, merged, and quantized again as transformers quantizes them "
        "(Fp8Quantize, the base's blocks); the others are copied with their scales byte for byte, and config.json "
        "keeps its quantization_config. Requantizing rounds away part of the adapter's effect: `loraship verify` "
        "measures how much survives."
    )
    notes = (*(n for n in plan.notes if not n.startswith("The base is quantized (")), note)
    return replace(plan, tensors=tuple(tensors), config_updates=updates, notes=notes)


def requantized_output(plan: MergePlan, merged: Checkpoint) -> bool:
    """Whether ``merged`` was written with ``--requantize``: the weights the plan dequantizes are
    stored quantized in it."""
    fp8 = [t.name for t in plan.tensors if t.scale is not None and t.source is not None and t.source.dtype in FP8_CODES]
    return bool(fp8) and all(n in merged.tensors and merged.tensors[n].dtype in FP8_CODES for n in fp8)


def describe(config: Mapping[str, Any]) -> str:
    """``FP8, 128×128 blocks``."""
    quant = quantization(config) or {}
    block = quant.get("weight_block_size")
    size = f", {block[0]}×{block[1]} blocks" if isinstance(block, list) and len(block) == 2 else ""
    return f"{str(quant.get('quant_method', '')).upper()}{size}"


def dequantized(
    tensors: list[TensorPlan], config: Mapping[str, Any], scales: Mapping[str, TensorInfo], out_code: str | None,
    where: str,
) -> tuple[list[TensorPlan], str]:  # fmt: skip
    """The planned tensors of a quantized base with each quantized weight read through its scales
    (which leave the output) and written in 16 bits, and a note that says so.

    Raises:
        BaseModelError: A weight's shape does not divide into its scale grid.
    """
    code = output_code(config, out_code if out_code != "F64" else "F32")
    scale_names = {s.name for s in scales.values()}
    out = []
    for t in tensors:
        source = t.source
        if t.name in scale_names:
            continue
        if isinstance(source, PackedTensor) and source.blocks is not None:  # MXFP4
            t = replace(t, dtype=code, source=source.blocks, scale=source.scales)
        elif source is not None and source.name in scales:  # FP8
            try:
                block_grid(source.shape, scales[source.name].shape)
            except ValueError as e:
                raise BaseModelError(
                    f"`{t.name}` in the base model `{where}` cannot be dequantized: {e}.",
                    fix="Merge into the full-precision model this one was quantized from: pass it with --base.",
                ) from e
            t = replace(t, dtype=code, scale=scales[source.name])
        out.append(t)
    count = sum(1 for t in out if t.scale is not None)
    how = "Mxfp4Config" if method(config) == "mxfp4" else "FineGrainedFP8Config"
    note = (
        f"The base is quantized ({describe(config)}): its {count} quantized weights are dequantized as transformers "
        f"dequantizes them ({how}(dequantize=True)) and written in {CODE_NAMES.get(code, code)}, with the adapter "
        "merged in; config.json loses its quantization_config."
    )
    return out, note
