"""Fetch stage: the base, after its config is checked and the preflight passed.

Two ways, each taking the run's context and the resolved base (source and commit):

- :func:`stream_base` (a streaming run with a Hub base): returns :class:`StreamedBase`, the base's
  folder with its small files and a placeholder per weight file, and the weight files still to
  download (they come during the merge); None when the base is local or has no safetensors weights.
- :func:`fetch_base` (the sequential path): returns the base as an :class:`~loraship.run.context.Input`,
  downloaded whole (or the local folder).

Only what is needed is fetched (:func:`base_files`): safetensors weights, configs, tokenizer and
chat template, card.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraship.engine.quantized import check_base, check_requantizable
from loraship.engine.repo_files import WEIGHT_DIRS, WEIGHT_SUFFIXES
from loraship.engine.safetensors_io import read_header
from loraship.errors import BaseModelError
from loraship.hub.client import RepoState
from loraship.run.context import Input, RunContext
from loraship.run.disk import CACHE, room
from loraship.run.job import Source
from loraship.run.preflight import check_machine
from loraship.run.streaming import remote_base


@dataclass(frozen=True)
class StreamedBase:
    """A Hub base for a streaming run: its folder (the weights in ``downloads`` are placeholders
    there until the merge's feed downloads them), and the weight files still to download (none when
    the Hugging Face cache holds them)."""

    base: Input
    downloads: tuple[str, ...]


def fetch_base(ctx: RunContext, source: Source, state: RepoState | None) -> Input:
    if state is None:
        assert source.path is not None
        config_file = source.path / "config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        if source.path.is_dir():  # a missing folder is refused by the merge, with its own message
            sizes = {p.name: p.stat().st_size for p in source.path.iterdir() if p.is_file()}
            check_machine(ctx, config, sizes, 0)
        return Input(source, source.path)
    hub = ctx.hub_client()
    config = base_config(ctx, state)
    files = base_files(state.files, allow_pickle=ctx.job.allow_pickle,
                       remote_code=ctx.job.trust_remote_code)  # fmt: skip
    sizes = hub.file_sizes(state)
    missing = hub.missing_from_cache(state, files)
    check_machine(ctx, config, {f: sizes.get(f, 0) for f in files}, sum(sizes.get(f, 0) for f in missing))
    ctx.log(f"Downloading the base {state} ({len(files)} files) ...")
    with room("the base's files", cache_folder(), CACHE):
        folder = hub.fetch(state, files)
    return Input(source, folder, state)


def stream_base(ctx: RunContext, source: Source, state: RepoState | None) -> StreamedBase | None:
    """A Hub base for a streaming run: its small files and a placeholder per weight file (the
    weights come during the merge), and the weight files still to download. None when the base
    is local or has no safetensors weights (the sequential path takes those)."""
    if state is None:
        return None
    hub = ctx.hub_client()
    config = base_config(ctx, state)
    files = base_files(state.files, allow_pickle=ctx.job.allow_pickle,
                       remote_code=ctx.job.trust_remote_code)  # fmt: skip
    weights = [f for f in files if "/" not in f and f.endswith(".safetensors")]
    if not weights:
        return None
    missing = hub.missing_from_cache(state, files)
    sizes = hub.file_sizes(state)
    folder = ctx.work / "base"
    keep = ctx.keep()
    if not set(weights) & set(missing):  # the cache holds the weights already: merge from there
        check_machine(ctx, config, {f: sizes.get(f, 0) for f in files}, 0, streaming=folder, keep=keep)
        ctx.log(f"The base {state} is in the Hugging Face cache: streaming the merge and upload from there ...")
        with room("the base's files", cache_folder(), CACHE):
            cached = hub.fetch(state, files)
        return StreamedBase(Input(source, cached, state), ())
    ctx.log(f"Reading the base {state} ({len(weights)} weight files, downloaded while merging) ...")
    remote_base(hub, state, files, sizes, folder)  # the small files and the weights' headers
    largest = max((i.nbytes for f in weights for i in read_header(folder / f)[1].values()), default=0)
    check_machine(ctx, config, {f: sizes.get(f, 0) for f in files}, sum(sizes.get(f, 0) for f in weights),
                  streaming=folder, keep=keep, largest_tensor=largest)  # fmt: skip
    return StreamedBase(Input(source, folder, state), tuple(weights))


def base_config(ctx: RunContext, state: RepoState) -> dict[str, Any]:
    """The Hub base's config.json (downloaded alone), after refusing bases loraship cannot merge into.

    Raises:
        BaseModelError: Not a transformers model, or quantized in a way that cannot be merged into.
    """
    hub = ctx.hub_client()
    if "config.json" not in state.files:
        raise BaseModelError(
            f"The base `{state}` has no config.json: it is not a transformers model repo.",
            fix="Set `base:` (or --base) to the full model the adapter was trained on.",
        )
    with room("the base's config.json", cache_folder(), CACHE):
        config_dir = hub.fetch(state, ["config.json"])  # small: refuse quantized bases before the weights
    config: dict[str, Any] = json.loads((config_dir / "config.json").read_text())
    try:
        check_base(config, where=str(state))
    except BaseModelError as e:
        guess = full_precision_guess(state.repo_id)
        hint = f" (perhaps `{guess}`)" if guess else ""
        raise BaseModelError(
            e.message,
            fix=f"Set `base:` in the job (or --base) to the full-precision model{hint}; adapters trained on a "
            "quantized copy merge into the original weights.",
        ) from e
    if ctx.job.requantize:
        check_requantizable(config, str(state))
    return config


def cache_folder() -> Path:
    """The Hugging Face cache the base downloads into (HF_HUB_CACHE, or HF_HOME's ``hub``)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def base_files(files: tuple[str, ...], *, allow_pickle: bool, remote_code: bool) -> list[str]:
    """The base repo's files worth downloading: its safetensors weights and every non-weight file
    that goes into the merged repo; not its weights in other formats."""
    has_safetensors = any(f == "model.safetensors" or f == "model.safetensors.index.json" for f in files)
    chosen = []
    for name in files:
        top = name.split("/")[0]
        if "/" not in name and name.endswith(WEIGHT_SUFFIXES):
            if (name.startswith("model") and name.endswith(".safetensors")) or (
                allow_pickle and not has_safetensors and name.startswith("pytorch_model") and name.endswith(".bin")
            ):
                chosen.append(name)
            continue
        if top in WEIGHT_DIRS or name.startswith(".") or (name.endswith(".py") and not remote_code):
            continue
        chosen.append(name)
    return chosen


def full_precision_guess(repo_id: str) -> str | None:
    """``unsloth/llama-3-8b-bnb-4bit`` -> ``unsloth/llama-3-8b``: a hint, not an answer."""
    import re

    owner, name = repo_id.split("/", 1)
    stripped = re.sub(r"[-_.]?(bnb[-_]?)?(4|8)bit$|[-_.](gptq|awq|fp8|int4|int8)([-_.].*)?$", "", name, flags=re.I)
    return f"{owner}/{stripped}" if stripped and stripped != name else None
