"""Tiny random models and adapters, built offline (for ``loraship demo``, tests and benchmarks).

Models come from transformers configs with random weights; adapters from PEFT with
``init_lora_weights=False`` so that ``lora_B`` is not zero and the merge changes something.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

TINY_LLAMA: dict[str, Any] = {
    "model_type": "llama",
    "vocab_size": 96,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "tie_word_embeddings": False,
}


def build_model(
    folder: Path,
    config: Mapping[str, Any],
    *,
    model_class: str = "AutoModelForCausalLM",
    dtype: str = "float32",
    seed: int = 0,
    max_shard_size: str | None = None,
    tokenizer: bool = False,
) -> Path:
    """Save a random model of ``config`` (a dict with ``model_type``) in ``folder``."""
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = dict(config)
    model_type = cfg.pop("model_type")
    auto_config = transformers.AutoConfig.for_model(model_type, **cfg)
    cls = getattr(transformers, model_class)
    model = cls.from_config(auto_config) if model_class.startswith("Auto") else cls(auto_config)
    with torch.no_grad():  # random, non-trivial values everywhere (norms and biases too)
        for p in model.parameters():
            p.normal_(0.0, 0.2) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    model = model.to(getattr(torch, dtype))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(folder), **kwargs)
    if tokenizer:
        save_tokenizer(folder, int(auto_config.vocab_size))
    return folder


def save_tokenizer(folder: Path, vocab_size: int, *, extra_tokens: tuple[str, ...] = ()) -> None:
    """A small word-level fast tokenizer with a chat template, written with transformers."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "<pad>"] + [f"w{i}" for i in range(vocab_size - 4 - len(extra_tokens))]
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    if extra_tokens:
        fast.add_tokens(list(extra_tokens))
    fast.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    fast.save_pretrained(str(folder))


def build_adapter(
    base: Path,
    folder: Path,
    *,
    model_class: str = "AutoModelForCausalLM",
    seed: int = 1,
    adapter_dtype: str | None = None,
    resize_vocab: int | None = None,
    save_kwargs: Mapping[str, Any] | None = None,
    **lora: Any,
) -> Path:
    """Train nothing, but save a PEFT LoRA adapter with random non-zero weights for ``base``.

    ``lora`` are LoraConfig arguments (``target_modules``, ``r``, ``use_dora``...).
    """
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = getattr(transformers, model_class).from_pretrained(str(base), dtype=torch.float32)
    if resize_vocab:
        model.resize_token_embeddings(resize_vocab, mean_resizing=False)
    lora.setdefault("init_lora_weights", False)
    lora.setdefault("r", 4)
    lora.setdefault("lora_alpha", 8)
    peft_model = get_peft_model(model, LoraConfig(**lora))
    with torch.no_grad():  # make every trained tensor differ visibly from the base
        for name, p in peft_model.named_parameters():
            if (p.requires_grad and ("lora_" in name or "modules_to_save" in name or "trainable_tokens" in name)) or (
                p.requires_grad and name.endswith("bias")
            ):
                p.add_(torch.randn_like(p) * 0.1)
    if adapter_dtype:
        peft_model = peft_model.to(getattr(torch, adapter_dtype))
    peft_model.save_pretrained(str(folder), **dict(save_kwargs or {}))
    return folder


def build_method_adapter(
    base: Path,
    folder: Path,
    peft_type: str,
    *,
    model_class: str = "AutoModelForCausalLM",
    seed: int = 1,
    adapter_dtype: str | None = None,
    **settings: Any,
) -> Path:
    """Save an adapter of any PEFT method (``LOHA``, ``IA3``...) for ``base``, every trained tensor random.

    ``settings`` are the method's config arguments (``target_modules``, ``r``...). PEFT initialises
    some methods to change nothing (LoHa's w2_a, LN tuning's copy of the norm): every trainable
    tensor gets noise added, so the merge changes something.
    """
    import torch
    import transformers
    from peft import get_peft_model
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    from peft.utils import PeftType

    torch.manual_seed(seed)
    model = getattr(transformers, model_class).from_pretrained(str(base), dtype=torch.float32)
    peft_model = get_peft_model(model, PEFT_TYPE_TO_CONFIG_MAPPING[PeftType(peft_type)](**settings))
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    if adapter_dtype:
        peft_model = peft_model.to(getattr(torch, adapter_dtype))
    peft_model.save_pretrained(str(folder))
    return folder


def quantize_fp8(folder: Path, *, block: tuple[int, int] = (128, 128), pattern: str = r"_proj\.weight$") -> Path:
    """Rewrite a saved model as a block-scaled FP8 checkpoint, as DeepSeek-V3 and Qwen3 FP8 releases
    are stored: each matching 2-D weight as float8_e4m3fn with a float32 ``weight_scale_inv`` per
    ``block`` (amax / 448), and a ``quantization_config`` of ``quant_method: fp8``."""
    import json
    import re

    import torch
    from safetensors.torch import load_file, save_file

    regex = re.compile(pattern)
    for path in sorted(folder.glob("*.safetensors")):
        tensors = load_file(path)
        out: dict[str, torch.Tensor] = {}
        for name, w in tensors.items():
            out[name] = w
            if w.dim() != 2 or not regex.search(name):
                continue
            rows, cols = w.shape
            grid = (-(-rows // block[0]), -(-cols // block[1]))
            padded = torch.nn.functional.pad(w.float(), (0, grid[1] * block[1] - cols, 0, grid[0] * block[0] - rows))
            blocks = padded.reshape(grid[0], block[0], grid[1], block[1])
            scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0
            q = (blocks / scale[:, None, :, None]).reshape(grid[0] * block[0], grid[1] * block[1])
            out[name] = q[:rows, :cols].to(torch.float8_e4m3fn)
            out[f"{name}_scale_inv"] = scale
        save_file(out, path, metadata={"format": "pt"})
    index = folder / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        weight_map = data["weight_map"]
        for name, file in list(weight_map.items()):
            if regex.search(name):
                weight_map[f"{name}_scale_inv"] = file
        index.write_text(json.dumps(data, indent=2))
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": list(block)}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def quantize_mxfp4(folder: Path) -> Path:
    """Rewrite a saved GPT-OSS model as its MXFP4 release is stored: each expert parameter
    ``experts.X`` (experts, in, out) as ``X_blocks`` (packed FP4, two values a byte, 32 values a
    block along ``in``) and ``X_scales`` (one E8M0 exponent a block), with ``quant_method: mxfp4``."""
    import json

    import torch
    from safetensors.torch import load_file, save_file

    from loraship.engine.quantized import FP4_VALUES

    lut = torch.tensor(FP4_VALUES)
    for path in sorted(folder.glob("*.safetensors")):
        out: dict[str, torch.Tensor] = {}
        for name, w in load_file(path).items():
            if w.dim() != 3 or not name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                out[name] = w
                continue
            rows = w.float().transpose(1, 2)  # (experts, out, in)
            groups = rows.reshape(*rows.shape[:2], rows.shape[2] // 32, 32)
            amax = groups.abs().amax(dim=-1).clamp(min=2.0**-100)
            exponent = torch.ceil(torch.log2(amax / 6.0)).clamp(-127, 127)
            scaled = groups / torch.exp2(exponent)[..., None]
            index = (scaled[..., None] - lut).abs().argmin(dim=-1).to(torch.uint8)  # nearest FP4 value
            out[f"{name}_blocks"] = index[..., 0::2] | (index[..., 1::2] << 4)
            out[f"{name}_scales"] = (exponent + 127).to(torch.uint8)
        save_file(out, path, metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder
