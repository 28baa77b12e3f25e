"""Planning over generated adapter and base configs: every failure is a LorashipError, in bounded time."""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from conftest import LLAMA
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loraship.engine import patterns
from loraship.engine.merge import prepare_merge
from loraship.errors import LorashipError
from loraship.tiny import build_adapter, build_model

NAMES = ["q_proj", "v_proj", "k_proj", "self_attn", "layers.0.self_attn.q_proj", "nothing", "", "lm_head"]
REGEXES = [r".*\.(q_proj|v_proj)", r".*", "q_proj", "([", "(.*.*.*)*X", r"(?<!k)_proj", r"layers\.(\d+)\..*", "(a)\\1"]
NUMBERS = st.one_of(
    st.integers(min_value=-2, max_value=70),
    st.sampled_from([0, 10**9, 10**12, 1.5, math.nan, math.inf, True, "8", None]),
)
SIZES = st.sampled_from([16, 15, 0, -1, 10**12, 1.0, math.nan, "16", None, True])


adapter_changes = st.fixed_dictionaries(
    {},
    optional={
        "target_modules": st.one_of(st.lists(st.sampled_from(NAMES), max_size=3), st.sampled_from(REGEXES), st.none()),
        "rank_pattern": st.dictionaries(st.sampled_from(NAMES + REGEXES), NUMBERS, max_size=2),
        "alpha_pattern": st.dictionaries(st.sampled_from(NAMES + REGEXES), NUMBERS, max_size=2),
        "r": NUMBERS,
        "lora_alpha": NUMBERS,
        "layers_to_transform": st.one_of(
            NUMBERS, st.lists(st.one_of(st.integers(-2, 3), st.sampled_from([10**9, 1e9, True])), max_size=3)
        ),
        "layers_pattern": st.sampled_from(["layers", "(.*.*.*)*X", "([", None, ["layers", "h"]]),
        "modules_to_save": st.one_of(st.none(), st.lists(st.sampled_from(NAMES + REGEXES), max_size=2)),
    },
)
base_changes = st.fixed_dictionaries(
    {},
    optional={
        "hidden_size": SIZES,
        "num_hidden_layers": st.sampled_from([2, 1, 0, 3, -1, 10**12, 2.0, None]),
        "num_attention_heads": SIZES,
        "num_key_value_heads": SIZES,
        "intermediate_size": SIZES,
        "vocab_size": SIZES,
        "max_position_embeddings": SIZES,
        "torch_dtype": st.sampled_from(["float32", "bfloat16", "os.system", "torch.float16", 3, None]),
    },
)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("property")
    base = build_model(root / "base", LLAMA)
    return base, build_adapter(base, root / "adapter", target_modules=["q_proj", "v_proj"])


def _write(path: Path, changes: dict[str, Any]) -> None:
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.timeout(240)
@settings(
    max_examples=50, derandomize=True, deadline=timedelta(seconds=20), database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)  # fmt: skip
@given(adapter=adapter_changes, base=base_changes)
def test_planning_generated_configs_fails_only_clearly(
    pair: tuple[Path, Path], adapter: dict[str, Any], base: dict[str, Any]
) -> None:
    with tempfile.TemporaryDirectory(prefix="loraship-hostile-") as tmp, \
            mock.patch.object(patterns, "DEADLINE_S", 1.0):  # fmt: skip
        base_dir, adapter_dir = Path(tmp) / "base", Path(tmp) / "adapter"
        shutil.copytree(pair[0], base_dir)
        shutil.copytree(pair[1], adapter_dir)
        _write(adapter_dir / "adapter_config.json", adapter)
        _write(base_dir / "config.json", base)
        start = time.monotonic()
        try:
            prepare_merge(base_dir, adapter_dir, scratch=Path(tmp) / "scratch")
        except LorashipError as e:
            assert e.message and e.fix, e
        assert time.monotonic() - start < 15
