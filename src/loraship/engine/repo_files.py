"""Which non-weight files of the base (and the adapter) go into the merged model folder.

The merged folder is the base repo with merged weights: configs, tokenizer, chat template and
library files (e.g. a sentence-transformers model's modules) are carried over; the base's model
card is not (a new one is generated), nor are the base's weights in other formats (they would be
stale, unmerged copies). The adapter's tokenizer and chat template win over the base's, since an
adapter trained with added tokens or a new template ships them.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraship.errors import InputError

TOKENIZER_FILES = frozenset(
    {
        "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
        "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "spiece.model",
        "sentencepiece.bpe.model", "tekken.json", "qwen.tiktoken", "tiktoken.model", "vocab.model",
    }
)  # fmt: skip
CHAT_TEMPLATE_FILES = frozenset({"chat_template.jinja", "chat_template.json"})
CHAT_TEMPLATE_DIRS = frozenset({"additional_chat_templates"})
#: Top-level files that hold weights in formats loraship does not write (stale after a merge).
WEIGHT_SUFFIXES = (
    ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx", ".onnx_data",
    ".tflite", ".pdparams", ".npz",
)  # fmt: skip
#: Top-level folders that hold the base's weights in another format.
WEIGHT_DIRS = frozenset({"onnx", "openvino", "original", "coreml", "gguf", "tflite"})
SKIP_NAMES = frozenset({".gitattributes", ".git", ".cache", ".huggingface"})
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
CONFIG_NAME = "config.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
CARD_NAME = "README.md"


@dataclass(frozen=True)
class FileChoice:
    """One file of the merged folder and where it comes from, or why a file is left out."""

    path: str
    source: Path | None
    reason: str


def check_input_folder(folder: Path, what: str) -> None:
    """Refuse a folder with anything but regular files and folders inside it.

    A link that leads out of the folder (to ``/proc/self/environ``, ``~/.ssh``...) would put a file of
    this machine into the merged model; a FIFO or device would hang or flood the read. Links inside
    the folder are fine, and so are the Hugging Face cache's links from a snapshot to its blobs.

    Raises:
        InputError: Naming the entry and what to do.
    """
    if not folder.is_dir():
        return
    root = folder.resolve()
    blobs = next((p.parent / "blobs" for p in (root, *root.parents) if p.name == "snapshots"), None)
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        for name in sorted(dirnames + filenames):
            path = Path(dirpath) / name
            rel = path.relative_to(folder).as_posix()
            if path.is_symlink():
                target = path.resolve()
                inside = target.is_relative_to(root) or (blobs is not None and target.is_relative_to(blobs))
                if not inside:
                    raise InputError(
                        f"`{rel}` in the {what} folder `{folder}` is a link to `{target}`, outside that folder. "
                        "loraship reads only files inside the folders it is given, so that no other file of this "
                        "machine can end up in a merged model.",
                        fix="Replace the link with a copy of the file, or remove it from the folder.",
                    )
                if target.is_dir():
                    continue
            mode = path.stat().st_mode if path.exists() else 0
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise InputError(
                    f"`{rel}` in the {what} folder `{folder}` is not a regular file (a broken link, a FIFO, a "
                    "socket or a device); loraship reads only regular files.",
                    fix="Remove it from the folder.",
                )


def choose_files(
    base: Path, adapter: Path, *, replaced_weights: Iterable[str], keep_code: bool = False
) -> list[FileChoice]:
    """Decide the merged folder's non-weight files.

    Args:
        base: The base model folder.
        adapter: The adapter folder.
        replaced_weights: Base weight files (relative names) the merge rewrites.
        keep_code: Carry the base's Python files (remote code) over; without it they are left out.

    Returns:
        Files to copy (``source`` set) and files left out (``source`` None), with reasons.
    """
    replaced = set(replaced_weights) | {"model.safetensors.index.json"}
    adapter_names = {p.name for p in adapter.iterdir() if p.is_file()} if adapter.is_dir() else set()
    adapter_dirs = {p.name for p in adapter.iterdir() if p.is_dir()} if adapter.is_dir() else set()
    adapter_tokenizer = bool(adapter_names & TOKENIZER_FILES)
    adapter_template = bool(adapter_names & CHAT_TEMPLATE_FILES or adapter_dirs & CHAT_TEMPLATE_DIRS)
    replaced_by_adapter: set[str] = set()
    if adapter_tokenizer:
        replaced_by_adapter |= TOKENIZER_FILES | CHAT_TEMPLATE_FILES | CHAT_TEMPLATE_DIRS
    elif adapter_template:
        replaced_by_adapter |= CHAT_TEMPLATE_FILES | CHAT_TEMPLATE_DIRS

    choices: list[FileChoice] = []
    for path in sorted(base.rglob("*")):
        if not path.is_file():
            continue
        rel = path.relative_to(base)
        top = rel.parts[0]
        name = rel.as_posix()
        if top in SKIP_NAMES:
            continue
        if name in replaced:
            continue
        if len(rel.parts) == 1:
            if name == CARD_NAME:
                choices.append(FileChoice(name, None, "the base's model card: a new card describes the merged model"))
                continue
            if name in ADAPTER_FILES:
                choices.append(FileChoice(name, None, "adapter files do not belong in a merged model"))
                continue
            if name.endswith(WEIGHT_SUFFIXES) or name.startswith(("pytorch_model", "tf_model", "flax_model")):
                choices.append(FileChoice(name, None, "weights of the unmerged base in another format"))
                continue
        elif top in WEIGHT_DIRS:
            choices.append(FileChoice(name, None, "weights of the unmerged base in another format"))
            continue
        if top in replaced_by_adapter:
            choices.append(FileChoice(name, None, "replaced by the adapter's tokenizer / chat template"))
            continue
        if name.endswith(".py") and not keep_code:
            choices.append(FileChoice(name, None, "Python code of the base: carried only with --trust-remote-code"))
            continue
        choices.append(FileChoice(name, path, "from the base"))
    wanted = TOKENIZER_FILES | CHAT_TEMPLATE_FILES if adapter_tokenizer else CHAT_TEMPLATE_FILES
    for name in sorted(adapter_names & wanted):
        choices.append(FileChoice(name, adapter / name, "from the adapter"))
    for dirname in sorted(adapter_dirs & CHAT_TEMPLATE_DIRS):
        if adapter_tokenizer or adapter_template:
            for path in sorted((adapter / dirname).rglob("*")):
                if path.is_file():
                    choices.append(FileChoice(path.relative_to(adapter).as_posix(), path, "from the adapter"))
    return choices


def copy_files(choices: Iterable[FileChoice], dest: Path, *, config_updates: Mapping[str, Any]) -> list[str]:
    """Copy the chosen files into ``dest``, writing config.json with ``config_updates`` applied."""
    written = []
    for choice in choices:
        if choice.source is None:
            continue
        target = dest / choice.path
        target.parent.mkdir(parents=True, exist_ok=True)
        if choice.path == CONFIG_NAME:
            config = json.loads(choice.source.read_text())
            config = _without_host_path(update_config(config, config_updates), "_name_or_path")
            target.write_text(json.dumps(config, indent=2) + "\n")
        elif choice.path == TOKENIZER_CONFIG and (cleaned := _tokenizer_config(choice.source)) is not None:
            target.write_text(cleaned)
        else:
            shutil.copyfile(choice.source, target)
        written.append(choice.path)
    return written


def is_host_path(value: object) -> bool:
    """Whether a ``name_or_path`` value is a path on some machine rather than a Hub repo id (``org/name``
    or ``name``): absolute, home-relative, relative (``./x``, ``../x``), Windows-style, or deeper than
    ``org/name``."""
    if not isinstance(value, str) or not value:
        return False
    return value.startswith(("/", "~", ".")) or "\\" in value or ":" in value or value.count("/") > 1


def _without_host_path(config: dict[str, Any], key: str) -> dict[str, Any]:
    """The config without ``key`` when it holds a path (transformers writes the folder a model was loaded
    from there; it reads nothing from it, and the merged model must not carry a machine's path)."""
    if is_host_path(config.get(key)):
        config = {k: v for k, v in config.items() if k != key}
    return config


def _tokenizer_config(source: Path) -> str | None:
    """tokenizer_config.json without a host path in ``name_or_path`` (older transformers wrote one);
    None when the file can be copied as it is."""
    try:
        config = json.loads(source.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(config, dict) or not is_host_path(config.get("name_or_path")):
        return None
    return json.dumps(_without_host_path(config, "name_or_path"), indent=2, ensure_ascii=False) + "\n"


def update_config(config: dict[str, Any], updates: Mapping[str, Any]) -> dict[str, Any]:
    """config.json with the merge's changes (dtype, vocabulary, tying, head) applied."""
    config = dict(config)
    text = dict(config["text_config"]) if isinstance(config.get("text_config"), dict) else None
    if text is not None:
        config["text_config"] = text
    for key, value in updates.items():
        if key == "quantization_config" and value is None:  # dequantized: the output is not quantized
            config.pop(key, None)
            if text is not None:
                text.pop(key, None)
        elif key == "dtype":
            config["dtype"] = value
            if "torch_dtype" in config:
                config["torch_dtype"] = value
        elif key == "vocab_size" and key not in config and text is not None:
            text[key] = value
        else:
            config[key] = value
            if key == "tie_word_embeddings" and text is not None and key in text:
                text[key] = value
    return config
