"""Hostile configs: an adapter's author writes adapter_config.json, and through it picks the base's
config.json. Patterns, layer lists and sizes from them fail clearly and in bounded time.

Messages are asserted word for word: they are the product's interface when something is wrong.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import LLAMA

from loraship.cli import main
from loraship.tiny import build_adapter

PATTERN_FIX = (
    "Fix: Correct the pattern (PEFT matches it against module names with Python's re module), or save the adapter "
    "again with save_pretrained().\n"
)
SLOW_FIX = (
    "Fix: Rewrite the pattern without nested repetition (e.g. `.*\\.(q_proj|v_proj)` rather than `(.*.*)*_proj`), "
    "or list the module names instead.\n"
)
BASE_FIX = "Fix: Download the base model again, or pass the base the adapter was trained on.\n"
LAYERS_FIX = (
    "Fix: Restore adapter_config.json as PEFT saved it with these weights (layers_to_transform, layers_pattern).\n"
)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from loraship.tiny import build_model

    root = tmp_path_factory.mktemp("hostile")
    base = build_model(root / "base", LLAMA)
    return base, build_adapter(base, root / "adapter", target_modules=["q_proj", "v_proj"])


@pytest.fixture
def copies(pair: tuple[Path, Path], tmp_path: Path) -> tuple[Path, Path]:
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    shutil.copytree(pair[0], base)
    shutil.copytree(pair[1], adapter)
    return base, adapter


def edit(path: Path, **changes: Any) -> None:
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def plan(capsys: pytest.CaptureFixture[str], base: Path, adapter: Path) -> tuple[int, str]:
    code = main(["plan", "--base", str(base), "--adapter", str(adapter)])
    return code, capsys.readouterr().err


def slow_message(config: Path, what: str) -> str:
    return (
        f"Error: `{config}`: matching {what} `(.*.*.*)*X` against the model's module names did not finish in 5 "
        "seconds: the pattern backtracks catastrophically in Python's re module, which PEFT matches it with, so PEFT "
        "would hang on it too.\n" + SLOW_FIX
    )


# --------------------------------------------------------------------------- 1. catastrophic patterns


@pytest.mark.timeout(30)
def test_catastrophic_target_modules_refused_in_bounded_time(copies: tuple[Path, Path], capsys) -> None:
    base, adapter = copies
    config = adapter / "adapter_config.json"
    edit(config, target_modules="(.*.*.*)*X")
    start = time.monotonic()
    code, err = plan(capsys, base, adapter)
    assert time.monotonic() - start < 20
    assert (code, err) == (1, slow_message(config, "`target_modules`"))


@pytest.mark.slow
@pytest.mark.timeout(30)
def test_catastrophic_rank_pattern_key_refused_in_bounded_time(copies: tuple[Path, Path], capsys) -> None:
    base, adapter = copies
    config = adapter / "adapter_config.json"
    edit(config, rank_pattern={"(.*.*.*)*X": 8})
    start = time.monotonic()
    code, err = plan(capsys, base, adapter)
    assert time.monotonic() - start < 20
    assert (code, err) == (1, slow_message(config, "the `rank_pattern` key"))


@pytest.mark.slow
@pytest.mark.timeout(30)
def test_catastrophic_alpha_pattern_key_refused_in_bounded_time(copies: tuple[Path, Path], capsys) -> None:
    base, adapter = copies
    config = adapter / "adapter_config.json"
    edit(config, alpha_pattern={"(.*.*.*)*X": 8})
    start = time.monotonic()
    code, err = plan(capsys, base, adapter)
    assert time.monotonic() - start < 20
    assert (code, err) == (1, slow_message(config, "the `alpha_pattern` key"))


def test_ordinary_patterns_match_as_peft_does(copies: tuple[Path, Path], capsys) -> None:
    """A regex target_modules and patterns with repetition still plan (and agree with PEFT)."""
    base, adapter = copies
    edit(adapter / "adapter_config.json", target_modules=r".*\.(q_proj|v_proj)", rank_pattern={r"layers\.1\..*": 4},
         alpha_pattern={r"(?<!k)_?v_proj": 16})  # fmt: skip
    code = main(["plan", "--base", str(base), "--adapter", str(adapter)])
    out, err = capsys.readouterr()
    assert (code, err) == (0, "")
    assert "model.layers.0.self_attn.v_proj.weight  8x16   F32    LoRA r=4 scale=4" in out
    assert "model.layers.0.self_attn.q_proj.weight  16x16  F32    LoRA r=4 scale=2" in out


# --------------------------------------------------------------------------- 2. invalid patterns


def test_invalid_target_modules_regex(copies: tuple[Path, Path], capsys) -> None:
    base, adapter = copies
    config = adapter / "adapter_config.json"
    edit(config, target_modules="([")
    assert plan(capsys, base, adapter) == (
        1,
        f"Error: `{config}`: `target_modules` `([` is not a valid regular expression (unterminated character set).\n"
        + PATTERN_FIX,
    )


def test_invalid_rank_pattern_key(copies: tuple[Path, Path], capsys) -> None:
    base, adapter = copies
    config = adapter / "adapter_config.json"
    edit(config, rank_pattern={"([": 8})
    assert plan(capsys, base, adapter) == (
        1,
        f"Error: `{config}`: the `rank_pattern` key `([` is not a valid regular expression (unterminated character "
        "set).\n" + PATTERN_FIX,
    )


def test_invalid_alpha_pattern_key(copies: tuple[Path, Path], capsys) -> None:
    base, adapter = copies
    config = adapter / "adapter_config.json"
    edit(config, alpha_pattern={"q_proj(": 8})
    assert plan(capsys, base, adapter) == (
        1,
        f"Error: `{config}`: the `alpha_pattern` key `q_proj(` is not a valid regular expression (missing ), "
        "unterminated subpattern).\n" + PATTERN_FIX,
    )


# --------------------------------------------------------------------------- 3. layers_to_transform


def test_layers_to_transform_negative_and_float(copies: tuple[Path, Path], capsys) -> None:
    base, adapter = copies
    config = adapter / "adapter_config.json"
    config.write_text(config.read_text().replace('"layers_to_transform": null', '"layers_to_transform": [-1, 1e9]'))
    assert plan(capsys, base, adapter) == (
        1,
        f"Error: `{config}` sets `layers_to_transform` to [-1, 1000000000.0], but PEFT expects a layer number from 0 "
        "or a list of them there.\n"
        "Fix: Correct the field (see PEFT's LoraConfig), or save the adapter again with save_pretrained().\n",
    )


def test_layers_to_transform_names_no_layer(copies: tuple[Path, Path], capsys) -> None:
    base, adapter = copies
    config = adapter / "adapter_config.json"
    edit(config, layers_to_transform=[5, 10**9])
    assert plan(capsys, base, adapter) == (
        1,
        f"Error: `{config}` sets `layers_to_transform` to [5, 1000000000], which names no layer the adapter holds "
        "LoRA weights for (layers 0, 1): PEFT would target no layer and load none of them.\n" + LAYERS_FIX,
    )


def test_layers_to_transform_leaves_out_a_layer(copies: tuple[Path, Path], capsys) -> None:
    base, adapter = copies
    config = adapter / "adapter_config.json"
    edit(config, layers_to_transform=[1])
    assert plan(capsys, base, adapter) == (
        1,
        f"Error: `{config}` sets `layers_to_transform` to [1], but the adapter also holds LoRA weights for layer 0 "
        "(`model.layers.0.self_attn.q_proj`), which PEFT would leave out.\n" + LAYERS_FIX,
    )


def test_target_modules_matching_nothing(copies: tuple[Path, Path], capsys) -> None:
    base, adapter = copies
    config = adapter / "adapter_config.json"
    edit(config, target_modules=["no_such_proj"])
    assert plan(capsys, base, adapter) == (
        1,
        f"Error: `{config}` targets no module of LlamaForCausalLM: Target modules {{'no_such_proj'}} not found in the "
        "base model. Please check the target modules and try again.\n"
        "Fix: Restore adapter_config.json as PEFT saved it with these weights (target_modules, layers_to_transform, "
        "layers_pattern).\n",
    )


# --------------------------------------------------------------------------- 4. base config values


def test_base_hidden_size_negative(copies: tuple[Path, Path], capsys) -> None:
    base, adapter = copies
    edit(base / "config.json", hidden_size=-1)
    assert plan(capsys, base, adapter) == (
        1,
        f"Error: `{base / 'config.json'}` sets `hidden_size` to -1, but transformers needs a whole number from 1 "
        "there.\n" + BASE_FIX,
    )


def test_base_torch_dtype_not_a_dtype(copies: tuple[Path, Path], capsys) -> None:
    base, adapter = copies
    edit(base / "config.json", torch_dtype="os.system")
    assert plan(capsys, base, adapter) == (
        1,
        f'Error: `{base / "config.json"}` sets `torch_dtype` to "os.system", but transformers needs a torch dtype '
        "name such as `bfloat16` or `float32` there.\n" + BASE_FIX,
    )


def test_base_vocab_size_nan(copies: tuple[Path, Path], capsys) -> None:
    base, adapter = copies
    config = base / "config.json"
    text = json.dumps({**json.loads(config.read_text()), "vocab_size": "NAN"}).replace('"NAN"', "NaN")
    config.write_text(text)
    assert plan(capsys, base, adapter) == (
        1, f"Error: `{config}` sets `vocab_size` to NaN, but transformers needs a finite number there.\n" + BASE_FIX
    )  # fmt: skip


def test_base_nested_size_not_a_number(copies: tuple[Path, Path], capsys) -> None:
    base, adapter = copies
    edit(base / "config.json", text_config={"num_attention_heads": "2"})
    assert plan(capsys, base, adapter) == (
        1,
        f'Error: `{base / "config.json"}` sets `text_config.num_attention_heads` to "2", but transformers needs a '
        "whole number from 1 there.\n" + BASE_FIX,
    )


def test_base_config_is_a_list(copies: tuple[Path, Path], capsys) -> None:
    base, adapter = copies
    config = base / "config.json"
    config.write_text(json.dumps([json.loads(config.read_text())]))
    assert plan(capsys, base, adapter) == (
        1,
        f"Error: `{config}` holds a JSON list, not an object: it is not a transformers config.json.\n"
        "Fix: Download the base model again.\n",
    )


# --------------------------------------------------------------------------- 5. config vs checkpoint


@pytest.mark.timeout(60)
def test_base_layers_beyond_checkpoint_refused_before_building(copies: tuple[Path, Path], capsys) -> None:
    base, adapter = copies
    edit(base / "config.json", num_hidden_layers=10**12)
    start = time.monotonic()
    result = plan(capsys, base, adapter)
    assert time.monotonic() - start < 30
    assert result == (
        1,
        f"Error: `{base / 'config.json'}` sets `num_hidden_layers` to 1000000000000, but its checkpoint holds tensors "
        "for 2 layers at most: config.json does not describe these weights.\n" + BASE_FIX,
    )


@pytest.mark.timeout(60)
@pytest.mark.parametrize("field", ["hidden_size", "intermediate_size", "vocab_size"])
def test_base_widths_no_tensor_holds_refused(field: str, copies: tuple[Path, Path], capsys) -> None:
    """A width far beyond any stored dimension does not describe the weights (transformers cannot even build it)."""
    base, adapter = copies
    edit(base / "config.json", **{field: 10**9})
    assert plan(capsys, base, adapter) == (
        1,
        f"Error: `{base / 'config.json'}` sets `{field}` to 1000000000, but no tensor of its checkpoint is larger "
        "than 64 along any dimension: config.json does not describe these weights.\n" + BASE_FIX,
    )


@pytest.mark.timeout(60)
def test_base_experts_beyond_checkpoint_refused_before_building(model_cache, tmp_path: Path, capsys) -> None:
    """A MoE config naming 10**9 experts would have transformers build expert modules without end."""
    from conftest import GPT_OSS

    base = tmp_path / "base"
    shutil.copytree(model_cache(GPT_OSS), base)
    adapter = build_adapter(base, tmp_path / "adapter", target_modules=["q_proj"])
    edit(base / "config.json", num_local_experts=10**9)
    start = time.monotonic()
    result = plan(capsys, base, adapter)
    assert time.monotonic() - start < 30
    assert result == (
        1,
        f"Error: `{base / 'config.json'}` sets `num_local_experts` to 1000000000, but its checkpoint's tensors can "
        "hold 32 experts at most: config.json does not describe these weights.\n" + BASE_FIX,
    )


def test_target_modules_leaving_out_weights(copies: tuple[Path, Path], capsys) -> None:
    base, adapter = copies
    config = adapter / "adapter_config.json"
    edit(config, target_modules=["q_proj"])
    assert plan(capsys, base, adapter) == (
        1,
        f"Error: `{config}` does not target `model.layers.0.self_attn.v_proj` (nor 1 more module(s)), but the adapter "
        "holds LoRA weights for it: PEFT would leave them out when loading the adapter.\n"
        "Fix: Restore adapter_config.json as PEFT saved it with these weights (target_modules, layers_to_transform, "
        "modules_to_save, exclude_modules).\n",
    )


def test_target_modules_naming_a_module_peft_cannot_wrap(copies: tuple[Path, Path], capsys) -> None:
    base, adapter = copies
    edit(adapter / "adapter_config.json", target_modules=["self_attn"])
    code, err = plan(capsys, base, adapter)
    assert code == 1
    assert err.startswith(
        f"Error: PEFT refuses the configuration of `{adapter}`: Target module LlamaAttention( (q_proj)"
    )
    assert err.endswith("Fix: PEFT cannot load this adapter either: save it again with a configuration PEFT accepts.\n")
