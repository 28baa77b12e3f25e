"""Shared fixtures: tiny random models built in tmp folders, and PEFT as the reference."""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

# Before huggingface_hub is imported (it reads these at import): a throwaway cache, plain LFS uploads
# (the local test Hub does not speak xet), and a dead default endpoint so that nothing reaches the
# real Hub by accident; tests pass the local Hub's URL explicitly.
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="loraship-tests-hf-home-")
os.environ["HF_HUB_DISABLE_XET"] = "1"
os.environ["HF_ENDPOINT"] = "http://127.0.0.1:9"
os.environ.pop("HF_HUB_OFFLINE", None)
os.environ.pop("HF_TOKEN", None)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")

from transformers.utils import logging as hf_logging  # noqa: E402

hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()

from loraship.tiny import build_model  # noqa: E402

# tests/container/'s fixtures and hooks (images, act): a plugin, since a second conftest.py would take this
# module's name `conftest`, which the tests import from.
pytest_plugins = ["harness"]

LLAMA: dict[str, Any] = {
    "model_type": "llama", "vocab_size": 64, "hidden_size": 16, "intermediate_size": 24,
    "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
    "max_position_embeddings": 64, "tie_word_embeddings": False,
}  # fmt: skip
LLAMA_TIED = {**LLAMA, "tie_word_embeddings": True}
QWEN2 = {  # attention projections with biases
    "model_type": "qwen2", "vocab_size": 64, "hidden_size": 16, "intermediate_size": 24,
    "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
    "max_position_embeddings": 64, "tie_word_embeddings": False,
}  # fmt: skip
GPT2 = {  # Conv1D weights stored (in, out), tied embeddings
    "model_type": "gpt2", "vocab_size": 50, "n_embd": 16, "n_layer": 2, "n_head": 2, "n_positions": 32,
    "bos_token_id": 0, "eos_token_id": 0,
}  # fmt: skip
BERT = {  # non-causal encoder
    "model_type": "bert", "vocab_size": 60, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
    "intermediate_size": 24, "max_position_embeddings": 32, "num_labels": 3,
}  # fmt: skip
RESNET = {  # Conv2d, 1x1 and 3x3
    "model_type": "resnet", "num_channels": 3, "embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1],
    "layer_type": "bottleneck", "num_labels": 4,
}  # fmt: skip
WAV2VEC2 = {  # Conv1d feature extractor
    "model_type": "wav2vec2", "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
    "intermediate_size": 24, "conv_dim": [8, 8], "conv_stride": [2, 2], "conv_kernel": [3, 3],
    "num_conv_pos_embeddings": 4, "num_conv_pos_embedding_groups": 2, "vocab_size": 12,
    "do_stable_layer_norm": True, "feat_extract_norm": "layer",
}  # fmt: skip


def load_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model folder's safetensors files (read with the safetensors library)."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(path)))
    return out


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's raw bits, so that equality is bit equality (NaN, -0.0 included)."""
    if t.dtype == torch.bool:
        return t
    view = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.contiguous().view(view)


def assert_same_tensors(
    ours: Mapping[str, torch.Tensor], theirs: Mapping[str, torch.Tensor], *, upcast_ok: frozenset[str] = frozenset()
) -> None:
    """Same names, dtypes, shapes and bits.

    ``upcast_ok``: tensors that transformers may have upcast on load (``_keep_in_fp32_modules``):
    the reference may hold them in a wider dtype, if the values are exactly ours.
    """
    assert sorted(ours) == sorted(theirs)
    for name in theirs:
        a, b = ours[name], theirs[name]
        if name in upcast_ok and a.dtype != b.dtype and torch.equal(a.to(b.dtype), b):
            continue
        assert a.dtype == b.dtype, f"{name}: dtype {a.dtype} != {b.dtype}"
        assert a.shape == b.shape, f"{name}: shape {tuple(a.shape)} != {tuple(b.shape)}"
        same = torch.equal(bits(a), bits(b))
        if not same:
            diff = (a.double() - b.double()).abs()
            raise AssertionError(
                f"{name}: {(diff > 0).sum().item()} of {a.numel()} elements differ (max {diff.max().item():.3g})"
            )


def assert_changes_as_planned(plan: Any, ours: Mapping[str, torch.Tensor], base: Path) -> None:
    """The merge changed exactly the tensors its plan says the adapter changes, and some (no silent no-op)."""
    base_tensors = load_tensors(base)
    changed = {n for n, t in ours.items() if n not in base_tensors or not torch.equal(t, base_tensors[n])}
    assert changed == {t.name for t in plan.changed}
    assert changed


def peft_reference(
    base: Path,
    adapter: Path,
    out: Path,
    *,
    model_class: str = "AutoModelForCausalLM",
    dtype: torch.dtype | None = None,
    resize_vocab: int | None = None,
) -> dict[str, torch.Tensor]:
    """The usual way: load base with transformers, adapter with PEFT, merge_and_unload, save."""
    import transformers
    from peft import PeftModel

    cls = getattr(transformers, model_class)
    model = cls.from_pretrained(str(base), dtype=dtype or "auto")
    if resize_vocab:
        model.resize_token_embeddings(resize_vocab, mean_resizing=False)
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    merged.save_pretrained(str(out))
    return load_tensors(out)


def peft_outputs(
    base: Path,
    adapter: Path,
    inputs: Mapping[str, torch.Tensor],
    *,
    model_class: str = "AutoModelForCausalLM",
    resize_vocab: int | None = None,
) -> torch.Tensor:
    """Outputs of base + adapter through PEFT, unmerged, in fp32."""
    import transformers
    from peft import PeftModel

    model = getattr(transformers, model_class).from_pretrained(str(base), dtype=torch.float32)
    if resize_vocab:
        model.resize_token_embeddings(resize_vocab, mean_resizing=False)
    with torch.no_grad():
        return _main_output(PeftModel.from_pretrained(model, str(adapter)).eval()(**inputs))


def plain_outputs(folder: Path, inputs: Mapping[str, torch.Tensor], *, model_class: str = "AutoModelForCausalLM"):  # type: ignore[no-untyped-def]
    """Outputs of a model folder loaded with plain transformers (no PEFT), in fp32."""
    import transformers

    model = getattr(transformers, model_class).from_pretrained(str(folder), dtype=torch.float32)
    with torch.no_grad():
        return _main_output(model.eval()(**inputs))


def _main_output(out: Any) -> torch.Tensor:
    for name in ("logits", "last_hidden_state"):
        value = getattr(out, name, None)
        if value is not None:
            return value
    raise AssertionError(f"no logits in {type(out)}")


TOKENS = {"alice": "hf_alice_write_token", "alice-read": "hf_alice_read_token", "bob": "hf_bob_write_token"}


@pytest.fixture
def hub_server():  # type: ignore[no-untyped-def]
    """A fresh local Hub on 127.0.0.1 with users alice (org `team`), a read-only alice token, and bob."""
    from hub_server import start_hub, stop

    running = start_hub()
    running.hub.add_user(TOKENS["alice"], "alice", orgs=("team",))
    running.hub.add_user(TOKENS["alice-read"], "alice", orgs=("team",), role="read")
    running.hub.add_user(TOKENS["bob"], "bob")
    yield running.hub
    stop(running.server, running.thread)


#: The token the local GitHub (``github`` fixture) accepts.
GH_TOKEN = "ghs_local_test_token_0123456789"


@pytest.fixture
def github():  # type: ignore[no-untyped-def]
    """A fresh local GitHub REST API on 127.0.0.1 (tests/github_server.py) that accepts ``GH_TOKEN``."""
    from github_server import FakeGitHub
    from hub_server import serve, stop

    fake = FakeGitHub(token=GH_TOKEN)
    url, server, thread = serve(fake.app())
    fake.url = url
    yield fake
    stop(server, thread)


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Build (once per session) a tiny random base model; returns its folder."""
    root = tmp_path_factory.mktemp("bases")
    built: dict[str, Path] = {}

    def get(config: Mapping[str, Any], *, model_class: str = "AutoModelForCausalLM", dtype: str = "float32",
            max_shard_size: str | None = None, tokenizer: bool = False) -> Path:  # fmt: skip
        key = repr((sorted(config.items()), model_class, dtype, max_shard_size, tokenizer))
        if key not in built:
            folder = root / f"base{len(built)}"
            build_model(folder, config, model_class=model_class, dtype=dtype, max_shard_size=max_shard_size,
                        tokenizer=tokenizer)  # fmt: skip
            built[key] = folder
        return built[key]

    return get


GPT_OSS = {  # fused expert parameters stored (experts, in, out), as on disk
    "model_type": "gpt_oss", "vocab_size": 32, "hidden_size": 16, "intermediate_size": 8, "num_hidden_layers": 1,
    "num_attention_heads": 2, "num_key_value_heads": 1, "num_local_experts": 2, "num_experts_per_tok": 1,
    "head_dim": 8, "layer_types": ["full_attention"],
}  # fmt: skip
LLAMA_WIDE = {  # rows enough for the merge to split LoRA tensors into blocks (gate/up: 4200 x 64)
    **LLAMA, "hidden_size": 64, "intermediate_size": 4200, "num_hidden_layers": 1, "num_attention_heads": 4,
    "num_key_value_heads": 2,
}  # fmt: skip
GPT2_WIDE = {**GPT2, "n_embd": 1024, "n_layer": 1, "n_head": 8}  # Conv1D (1024, 3072): blocks of columns
