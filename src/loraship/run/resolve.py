"""Resolve stage: adapter and base to commit SHAs, used for everything after.

:func:`resolve` takes the run's context and returns :class:`Resolved`: the adapter, downloaded (it is
small: config, weights, tokenizer, card), the base's source and commit (nothing of it downloaded yet,
its source read from the adapter's config when the job names none), and the provenance key.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from loraship.engine.adapter import CONFIG_NAME as ADAPTER_CONFIG
from loraship.engine.adapter import PICKLE_NAME, WEIGHTS_NAME
from loraship.engine.repo_files import CARD_NAME, CHAT_TEMPLATE_FILES, TOKENIZER_FILES
from loraship.errors import AdapterError
from loraship.hub.client import RepoState
from loraship.run.context import Input, RunContext
from loraship.run.job import MergeJob, Source
from loraship.run.output import check_overlap


@dataclass(frozen=True)
class Resolved:
    """What the resolve stage hands on: the adapter (on disk), the base (its commit on the Hub, or a
    local folder), the provenance key, and the base's and adapter's labels."""

    adapter: Input
    base_source: Source
    base_state: RepoState | None
    key: str
    labels: tuple[str, str]


def resolve(ctx: RunContext) -> Resolved:
    job = ctx.job
    ctx.log(f"Resolving the adapter {job.adapter} ...")
    adapter = fetch_adapter(ctx)
    base_source = job.base_source or base_from_adapter(adapter)
    check_overlap(ctx, base_source)
    ctx.log(f"Resolving the base {base_source} ...")
    base_state = (
        ctx.hub_client().repo(base_source.repo_id or "", base_source.revision) if not base_source.is_local else None
    )
    base = Input(base_source, base_source.path, base_state) if base_source.path is not None else None
    key = provenance_key(
        job,
        base_state.sha if base_state else None,
        adapter.state.sha if adapter.state else None,
        base_local=base.local_id if base else None,
        adapter_local=adapter.local_id,
    )
    labels = (str(base_state) if base_state else base.label if base else str(base_source), adapter.label)
    return Resolved(adapter, base_source, base_state, key, labels)


def fetch_adapter(ctx: RunContext) -> Input:
    source = ctx.job.adapter_source
    if source.is_local:
        assert source.path is not None
        return Input(source, source.path, config_name=ADAPTER_CONFIG)
    hub = ctx.hub_client()
    state = hub.repo(source.repo_id or "", source.revision)
    if ADAPTER_CONFIG not in state.files:
        hint = " (it looks like a full model: it has config.json)" if "config.json" in state.files else ""
        raise AdapterError(
            f"`{state.repo_id}` is not a PEFT adapter: it has no {ADAPTER_CONFIG}{hint}.",
            fix="Point `adapter:` at the repo PeftModel.push_to_hub() wrote (adapter_config.json + "
            "adapter_model.safetensors).",
        )
    ctx.log(f"Downloading the adapter {state} ...")
    folder = hub.fetch(state, adapter_files(state.files, allow_pickle=ctx.job.allow_pickle))
    return Input(source, folder, state, config_name=ADAPTER_CONFIG)


def base_from_adapter(adapter: Input) -> Source:
    config = json.loads((adapter.folder / ADAPTER_CONFIG).read_text())
    name, revision = config.get("base_model_name_or_path"), config.get("revision")
    shown = str(adapter.state or adapter.source)  # for the terminal: a local adapter by its path
    if not name:
        raise AdapterError(
            f"The adapter `{shown}` does not name its base model (no base_model_name_or_path in {ADAPTER_CONFIG}).",
            fix="Set `base:` in the job (or --base) to the model the adapter was trained on.",
        )
    from loraship.run.job import RepoIdRefused, parse_source

    try:
        named = parse_source(f"{name}@{revision}" if revision else str(name))
    except RepoIdRefused as e:
        raise AdapterError(
            f"The adapter `{shown}` names its base as `{name}` in {ADAPTER_CONFIG}, which the Hub refuses as a repo "
            f"id (huggingface_hub: {e.problem}).",
            fix="Set `base:` in the job (or --base) to the base model's Hub repo id.",
        ) from e
    except ValueError as e:
        raise AdapterError(
            f"The adapter `{shown}` names its base as `{name}`, which is neither a Hub repo nor a local "
            "folder here (it was probably a path on the machine that trained it).",
            fix="Set `base:` in the job (or --base) to the base model's Hub repo id.",
        ) from e
    if named.is_local and adapter.state is not None:
        # A Hub adapter's config is written by whoever can push to it: a local path there would make
        # this machine's folder (and every file in it) the base, and publish it with the merged model.
        raise AdapterError(
            f"The adapter `{shown}` comes from the Hub but names a local folder as its base "
            f"(`{name}` in {ADAPTER_CONFIG}): loraship takes a local base only from the job itself.",
            fix="Set `base:` in the job (or --base) to the base model's Hub repo id, or to the local folder "
            "if you mean it.",
        )
    return named


def names_hub_base(adapter: Path) -> bool:
    """Whether a local adapter's config names a Hub repo as its base (False when it cannot be read: the
    resolve stage says why)."""
    from loraship.run.job import parse_source

    try:
        name = json.loads((adapter / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
        return bool(name) and not parse_source(str(name)).is_local
    except (OSError, ValueError, AttributeError):
        return False


def provenance_key(
    job: MergeJob,
    base_sha: str | None,
    adapter_sha: str | None,
    *,
    base_local: str | None = None,
    adapter_local: str | None = None,
) -> str:
    """What identifies one publication: job hash, base SHA, adapter SHA (short).

    A local input has no SHA: ``base_local`` / ``adapter_local`` stand for it (``local:`` and the hash of
    its config, :attr:`Input.local_id <loraship.run.context.Input.local_id>`), never its path.
    """
    base = base_sha[:10] if base_sha else base_local or "local"
    adapter = adapter_sha[:10] if adapter_sha else adapter_local or "local"
    return f"[loraship {job.job_hash()} base {base} adapter {adapter}]"


def adapter_files(files: tuple[str, ...], *, allow_pickle: bool) -> list[str]:
    """The adapter repo's files worth downloading: config, weights, tokenizer, chat template, card."""
    wanted = {ADAPTER_CONFIG, WEIGHTS_NAME, CARD_NAME, *TOKENIZER_FILES, *CHAT_TEMPLATE_FILES}
    if allow_pickle and WEIGHTS_NAME not in files:
        wanted.add(PICKLE_NAME)
    chosen = [f for f in files if f in wanted or f.startswith("additional_chat_templates/")]
    return chosen
