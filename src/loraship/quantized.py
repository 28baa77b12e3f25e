"""Quantized bases: which formats are dequantized while streaming, and how; the others are refused.

A LoRA delta cannot be added to quantized weights without losing most of it, so a quantized base
is merged in full precision: each quantized tensor is dequantized as it streams, exactly as
transformers dequantizes it on load (``FineGrainedFP8Config(dequantize=True)``), the LoRA is
merged into the result as PEFT merges it, and the output is written in 16 bits without
``quantization_config``. Supported: block-scaled FP8 (``quant_method: fp8``: a float8 ``weight``
with a float32 ``weight_scale_inv`` per block; DeepSeek-V3, Qwen3 FP8 releases). Formats whose
dequantization loraship does not mirror bit for bit (bitsandbytes, GPTQ, AWQ...) are refused with
the 16-bit fix.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from loraship.errors import BaseModelError
from loraship.safetensors_io import Checkpoint, TensorInfo

#: quant_method values whose tensors loraship dequantizes (as transformers does) while streaming.
DEQUANTIZED = frozenset({"fp8"})
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
        "it with --base (in loraship.yaml: `base:`). loraship dequantizes block-scaled FP8 bases itself.",
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


def loader_kwargs(config: Mapping[str, Any]) -> dict[str, Any]:
    """What ``from_pretrained`` needs to load this base dequantized (the output check's reference)."""
    if method(config) == "fp8":
        from transformers import FineGrainedFP8Config

        return {"quantization_config": FineGrainedFP8Config(dequantize=True)}
    return {}


def describe(config: Mapping[str, Any]) -> str:
    """``FP8, 128×128 blocks``."""
    quant = quantization(config) or {}
    block = quant.get("weight_block_size")
    size = f", {block[0]}×{block[1]} blocks" if isinstance(block, list) and len(block) == 2 else ""
    return f"{str(quant.get('quant_method', '')).upper()}{size}"
