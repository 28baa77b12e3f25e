"""``run(job)``: resolve, fetch, merge, verify, card, publish — the product's main job.

1. **Resolve** adapter and base to commit SHAs first, and use those SHAs for everything after.
2. **Already published?** The output repo is searched for this provenance (base SHA, adapter SHA,
   job hash) before anything large is downloaded; if found, nothing is done.
3. **Fetch** only what is needed: safetensors weights, configs, tokenizer and chat template, cards.
4. **Merge** into a staging folder, **verify** it (nothing is published if verification fails),
   write the **card**.
5. **Publish**: one commit (or pull request) with every file, the provenance in its title, after
   checking once more that nobody published it meanwhile; then the tag. Or, for ``dir:`` outputs,
   the staged folder is renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from loraship import __version__
from loraship.engine.adapter import CONFIG_NAME as ADAPTER_CONFIG
from loraship.engine.adapter import PICKLE_NAME, WEIGHTS_NAME
from loraship.engine.merge import current_umask
from loraship.engine.quantized import check_base, check_requantizable
from loraship.engine.repo_files import CARD_NAME, CHAT_TEMPLATE_FILES, TOKENIZER_FILES, WEIGHT_DIRS, WEIGHT_SUFFIXES
from loraship.engine.safetensors_io import CODE_NAMES, read_header
from loraship.errors import AdapterError, BaseModelError, HubError, OutputError
from loraship.hub.client import CommitConflict, Hub, PreUpload, Publication, RepoState
from loraship.run.job import MergeJob, Source
from loraship.run.streaming import StreamResult, remote_base, reusable

Status = Literal["published", "already-published", "written", "dry-run"]


@dataclass(frozen=True)
class RunResult:
    """What a run did, for people (``table``) and for the Action and the bot (``to_json``)."""

    job: str
    status: Status
    output: str
    base: str
    adapter: str
    provenance: str
    repo_url: str | None = None
    commit_sha: str | None = None
    tag: str | None = None
    pr_url: str | None = None
    folder: str | None = None
    verified: bool | None = None
    report: dict[str, Any] | None = None
    report_markdown: str | None = None
    message: str = ""
    notes: tuple[str, ...] = field(default_factory=tuple)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


Log = Callable[[str], None]


def run(
    job: MergeJob,
    *,
    hub: Hub | None = None,
    workdir: Path | None = None,
    dry_run: bool = False,
    overwrite: bool = False,
    progress: bool = False,
    stream: bool = True,
    log: Log = print,
    stage: Log | None = None,
) -> RunResult:
    """Carry out one job; see the module docstring.

    Args:
        hub: The Hub client (built from HF_TOKEN / HF_ENDPOINT when None and a repo is involved).
        workdir: Where the merged folder is staged (a temporary folder when None).
        dry_run: Do everything but publish; the staged folder is kept and reported.
        stream: For a base on the Hub: download, merge, check and upload shard by shard
            (:mod:`loraship.run.streaming`); False downloads the whole base first (the sequential path).
        overwrite: For ``dir:`` outputs, replace a non-empty folder.
        log: Where progress messages go.
        stage: Called with each stage's name as it starts (resolve, fetch, merge, verify, publish).

    Raises:
        LorashipError: Any expected failure; nothing is published then.
    """
    needs_hub = not (job.adapter_source.is_local and (job.base_source is None or job.base_source.is_local))
    needs_hub = needs_hub or not job.output_target.is_local
    hub = hub or (Hub() if needs_hub else None)
    owned = workdir is None
    work = Path(tempfile.mkdtemp(prefix="loraship-run-")) if workdir is None else workdir
    work.mkdir(parents=True, exist_ok=True)
    try:
        runner = _Run(job, hub, work, dry_run=dry_run, overwrite=overwrite, progress=progress, log=log)
        runner.stream = stream
        runner.stage = stage or (lambda name: None)
        return runner.execute()
    finally:
        if owned and not dry_run:
            shutil.rmtree(work, ignore_errors=True)


@dataclass
class _Input:
    """A resolved input: where its files are, and which commit they come from."""

    source: Source
    folder: Path
    state: RepoState | None = None

    @property
    def label(self) -> str:
        return str(self.state) if self.state else str(self.source.path)

    @property
    def name(self) -> str:
        return self.state.repo_id if self.state else str(self.source.path)


class _Run:
    def __init__(
        self, job: MergeJob, hub: Hub | None, work: Path, *, dry_run: bool, overwrite: bool, progress: bool, log: Log
    ) -> None:
        self.job, self.hub, self.work, self.dry_run = job, hub, work, dry_run
        self.overwrite, self.progress, self.log = overwrite, progress, log
        self.stage: Log = lambda name: None
        self.target = job.output_target
        self.preupload: PreUpload | None = None
        self.stream = True
        self.streamed: StreamResult | None = None
        self.created: str | None = None  # the output repo this run created before verifying (a streaming run)

    def _hub(self) -> Hub:
        assert self.hub is not None
        return self.hub

    def execute(self) -> RunResult:
        if not self.target.is_local and not self.dry_run:
            self._check_write_access()
        self._check_overlap(self.job.adapter_source, self.job.base_source)
        staging = self._staging()  # a dir: output that cannot be written fails before any download
        try:
            return self._stages(staging)
        except BaseException:
            if self.target.is_local:  # the staging folder sits beside the output: leave nothing there
                shutil.rmtree(staging.parent, ignore_errors=True)
            if self.created is not None:  # an empty repo made for the streamed upload: gone again
                self._hub().delete_if_unchanged(self.target.repo_id or "", self.created)
            raise

    def _stages(self, staging: Path) -> RunResult:
        job = self.job
        self.stage("Resolve")
        self.log(f"Resolving the adapter {job.adapter} ...")
        adapter = self._adapter()
        base_source = job.base_source or self._base_from_adapter(adapter)
        self._check_overlap(base_source)
        self.log(f"Resolving the base {base_source} ...")
        base_state = (
            self._hub().repo(base_source.repo_id or "", base_source.revision) if not base_source.is_local else None
        )
        key = provenance_key(job, base_state.sha if base_state else None, adapter.state.sha if adapter.state else None)
        labels = (str(base_state) if base_state else str(base_source.path), adapter.label)
        if not self.target.is_local:
            found = self._hub().find_publication(self.target.repo_id or "", key)
            if found is not None:
                return self._already(found, key, labels)
        self.stage("Fetch")
        streamed = self._streamed_base(base_source, base_state) if self.stream else None
        if streamed is not None:
            base, feed = streamed
            result, report = self._stream_merge(base, adapter, feed, staging)
        else:
            base = self._base(base_source, base_state)
            self.stage("Merge")
            self.log(f"Merging into {staging} ...")
            from loraship.engine.merge import merge

            result = merge(base.folder, adapter.folder, staging, dtype=self._out_dtype(),
                           max_shard_size=job.shard_size, overwrite=True, allow_pickle=job.allow_pickle,
                           progress=self.progress, keep_code=job.trust_remote_code,
                           requantize=job.requantize)  # fmt: skip
            self.preupload = self._start_preupload(staging, result.weight_files)
            self.stage("Verify")
            report = self._verify(base, adapter, staging)
        notes = result.prepared.notes
        self.log("Writing the model card ...")
        (staging / CARD_NAME).write_text(self._card(base, adapter, staging, result, report, key))
        done = RunResult(
            job=job.name, status="dry-run", output=job.output, base=base.label, adapter=adapter.label, provenance=key,
            verified=report.passed if report else None, report=report.to_json() if report else None,
            report_markdown=report.to_markdown() if report else None, notes=tuple(notes),
        )  # fmt: skip
        if self.dry_run:
            message = f"Dry run: the repo's files are in {staging}; nothing was published."
            return replace(done, folder=str(staging), message=message)
        if self.target.is_local:
            folder = self._move_into_place(staging)
            return replace(done, status="written", folder=str(folder), message=f"Wrote {folder}.")
        return self._publish(staging, base, key, done)

    # -- inputs

    def _check_overlap(self, *sources: Source | None) -> None:
        if self.target.path is None:
            return
        from loraship.engine.merge import check_overlap

        local = [s.path for s in sources if s is not None and s.path is not None]
        check_overlap(self.target.path, local, fix="Choose an `output: dir:...` outside the base and adapter folders.")

    def _check_write_access(self) -> None:
        hub = self._hub()
        identity = hub.whoami()
        repo_id = self.target.repo_id or ""
        namespace = repo_id.split("/")[0]
        if not identity.can_write:
            raise HubError(
                f"The token of `{identity.name}` is read-only: it cannot publish `{repo_id}`.",
                fix="Use a token with write access (https://huggingface.co/settings/tokens) in HF_TOKEN or --token.",
            )
        if namespace not in (identity.name, *identity.orgs):
            raise HubError(
                f"`{identity.name}` cannot publish `{repo_id}`: the namespace `{namespace}` is neither this account "
                f"nor one of its organizations ({', '.join(identity.orgs) or 'none'}).",
                fix=f"Publish to `{identity.name}/{repo_id.split('/')[-1]}` (or an organization you belong to), or use "
                f"a token of a member of `{namespace}`.",
            )

    def _adapter(self) -> _Input:
        source = self.job.adapter_source
        if source.is_local:
            assert source.path is not None
            return _Input(source, source.path)
        hub = self._hub()
        state = hub.repo(source.repo_id or "", source.revision)
        if ADAPTER_CONFIG not in state.files:
            hint = " (it looks like a full model: it has config.json)" if "config.json" in state.files else ""
            raise AdapterError(
                f"`{state.repo_id}` is not a PEFT adapter: it has no {ADAPTER_CONFIG}{hint}.",
                fix="Point `adapter:` at the repo PeftModel.push_to_hub() wrote (adapter_config.json + "
                "adapter_model.safetensors).",
            )
        self.log(f"Downloading the adapter {state} ...")
        return _Input(source, hub.fetch(state, adapter_files(state.files, allow_pickle=self.job.allow_pickle)), state)

    def _base_from_adapter(self, adapter: _Input) -> Source:
        config = json.loads((adapter.folder / ADAPTER_CONFIG).read_text())
        name, revision = config.get("base_model_name_or_path"), config.get("revision")
        if not name:
            raise AdapterError(
                f"The adapter `{adapter.label}` does not name its base model (no base_model_name_or_path in "
                f"{ADAPTER_CONFIG}).",
                fix="Set `base:` in the job (or --base) to the model the adapter was trained on.",
            )
        from loraship.run.job import parse_source

        try:
            named = parse_source(f"{name}@{revision}" if revision else str(name))
        except ValueError as e:
            raise AdapterError(
                f"The adapter `{adapter.label}` names its base as `{name}`, which is neither a Hub repo nor a local "
                "folder here (it was probably a path on the machine that trained it).",
                fix="Set `base:` in the job (or --base) to the base model's Hub repo id.",
            ) from e
        if named.is_local and adapter.state is not None:
            # A Hub adapter's config is written by whoever can push to it: a local path there would make
            # this machine's folder (and every file in it) the base, and publish it with the merged model.
            raise AdapterError(
                f"The adapter `{adapter.label}` comes from the Hub but names a local folder as its base "
                f"(`{name}` in {ADAPTER_CONFIG}): loraship takes a local base only from the job itself.",
                fix="Set `base:` in the job (or --base) to the base model's Hub repo id, or to the local folder "
                "if you mean it.",
            )
        return named

    def _preflight(
        self,
        config: Mapping[str, Any],
        base_sizes: Mapping[str, int],
        download: int,
        *,
        streaming: Path | None = None,
        keep: bool = True,
        largest_tensor: int | None = None,
    ) -> None:
        """Refuse, before downloading, a run this machine's disks or memory cannot hold.

        ``streaming``: the folder a streaming run downloads the base's weights into (not the cache);
        without ``keep``, only a few base and merged shards are on disk at once (an output shard is
        at most the larger of the shard size and ``largest_tensor``, both as written).
        """
        from huggingface_hub import constants

        from loraship.run import preflight
        from loraship.run.streaming import BASE_WINDOW, OUTPUT_WINDOW
        from loraship.text import parse_size

        job, spec = self.job, self.job.verify
        e = preflight.element_sizes(config, self._out_dtype(), spec.dtype, requantize=job.requantize)
        weight_sizes = [n for f, n in base_sizes.items() if f.endswith(WEIGHT_SUFFIXES)]
        weights = sum(weight_sizes)
        others = sum(base_sizes.values()) - weights
        merged = int(weights / e.stored * e.written)
        staging = self.work if self.target.path is None else self.target.path.resolve().parent
        if streaming is None:
            preflight.check_disk([
                preflight.Need("the base's files, downloaded to the Hugging Face cache", Path(constants.HF_HUB_CACHE),
                               download),
                preflight.Need("the merged model, staged", staging, merged + others),
            ])  # fmt: skip
        elif keep:
            why = (
                "the output check reads both whole models"
                if spec.enabled and spec.outputs
                else "the merged model is kept"
            )
            preflight.check_disk([
                preflight.Need("the base's weights, downloaded for this run", streaming, download),
                preflight.Need("the merged model, staged", staging, merged + others),
            ], fix=f"Free space there, or put the run's folder (--workdir) on a disk with more room. Both models are "
                   f"on disk because {why}: with `verify: {{outputs: false}}` (every merged tensor is still compared "
                   "bit for bit with base + adapter) a run to the Hub holds only a few shards at a time.")  # fmt: skip
        else:
            biggest = max(weight_sizes, default=0)
            tensor = biggest if largest_tensor is None else largest_tensor
            shard = min(merged, max(parse_size(job.shard_size), int(tensor / e.stored * e.written)))
            preflight.check_disk([
                preflight.Need(f"{BASE_WINDOW + 1} of the base's weight files at a time", streaming,
                               min(download, (BASE_WINDOW + 1) * biggest)),
                preflight.Need(f"{OUTPUT_WINDOW} merged shards at a time", staging,
                               min(merged, OUTPUT_WINDOW * shard) + others),
            ], fix="Free space there, or put the run's folder (--workdir) on a disk with more room, or write smaller "
                   "shards (`max_shard_size` in loraship.yaml, or --max-shard-size).")  # fmt: skip
        if spec.enabled and spec.outputs and preflight.cpu_output_check(spec.device):
            preflight.check_memory(int(weights / e.stored * e.loaded), e.loaded_dtype, cap=spec.max_memory_bytes)

    def _out_dtype(self) -> str | None:
        return None if self.job.dtype == "keep" else self.job.dtype

    def _keep(self) -> bool:
        """Whether a streaming run keeps every shard on disk: the output check reads both whole
        models; a folder output or a dry run keeps the merged model."""
        spec = self.job.verify
        return (spec.enabled and spec.outputs) or self.target.is_local or self.dry_run

    def _base(self, source: Source, state: RepoState | None) -> _Input:
        if state is None:
            assert source.path is not None
            config_file = source.path / "config.json"
            config = json.loads(config_file.read_text()) if config_file.is_file() else {}
            if source.path.is_dir():  # a missing folder is refused by the merge, with its own message
                sizes = {p.name: p.stat().st_size for p in source.path.iterdir() if p.is_file()}
                self._preflight(config, sizes, 0)
            return _Input(source, source.path)
        hub = self._hub()
        config = self._base_config(state)
        files = base_files(state.files, allow_pickle=self.job.allow_pickle,
                           remote_code=self.job.trust_remote_code)  # fmt: skip
        sizes = hub.file_sizes(state)
        missing = hub.missing_from_cache(state, files)
        self._preflight(config, {f: sizes.get(f, 0) for f in files}, sum(sizes.get(f, 0) for f in missing))
        self.log(f"Downloading the base {state} ({len(files)} files) ...")
        return _Input(source, hub.fetch(state, files), state)

    def _base_config(self, state: RepoState) -> dict[str, Any]:
        """The Hub base's config.json (downloaded alone), after refusing bases loraship cannot merge into.

        Raises:
            BaseModelError: Not a transformers model, or quantized in a way that cannot be merged into.
        """
        hub = self._hub()
        if "config.json" not in state.files:
            raise BaseModelError(
                f"The base `{state}` has no config.json: it is not a transformers model repo.",
                fix="Set `base:` (or --base) to the full model the adapter was trained on.",
            )
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
        if self.job.requantize:
            check_requantizable(config, str(state))
        return config

    def _streamed_base(self, source: Source, state: RepoState | None) -> tuple[_Input, list[str]] | None:
        """A Hub base for a streaming run: its small files and a placeholder per weight file (the
        weights come during the merge), and the weight files still to download. None when the base
        is local or has no safetensors weights (the sequential path takes those)."""
        if state is None:
            return None
        hub = self._hub()
        config = self._base_config(state)
        files = base_files(state.files, allow_pickle=self.job.allow_pickle,
                           remote_code=self.job.trust_remote_code)  # fmt: skip
        weights = [f for f in files if "/" not in f and f.endswith(".safetensors")]
        if not weights:
            return None
        missing = hub.missing_from_cache(state, files)
        sizes = hub.file_sizes(state)
        folder = self.work / "base"
        keep = self._keep()
        if not set(weights) & set(missing):  # the cache holds the weights already: merge from there
            self._preflight(config, {f: sizes.get(f, 0) for f in files}, 0, streaming=folder, keep=keep)
            self.log(f"The base {state} is in the Hugging Face cache: streaming the merge and upload from there ...")
            return _Input(source, hub.fetch(state, files), state), []
        self.log(f"Reading the base {state} ({len(weights)} weight files, downloaded while merging) ...")
        remote_base(hub, state, files, sizes, folder)  # the small files and the weights' headers
        largest = max((i.nbytes for f in weights for i in read_header(folder / f)[1].values()), default=0)
        self._preflight(config, {f: sizes.get(f, 0) for f in files}, sum(sizes.get(f, 0) for f in weights),
                        streaming=folder, keep=keep, largest_tensor=largest)  # fmt: skip
        return _Input(source, folder, state), weights

    def _stream_merge(self, base: _Input, adapter: _Input, downloads: Sequence[str], staging: Path) -> tuple[Any, Any]:
        """Merge shard by shard while the base downloads; check and upload each shard as it is written."""
        from loraship.engine.merge import execute, input_files, prepare_merge, shard_layout
        from loraship.run.streaming import BASE_WINDOW, BaseFeed, ShardStream, StreamStopped

        job, spec = self.job, self.job.verify
        keep = self._keep()
        self.stage("Merge")
        with tempfile.TemporaryDirectory(prefix="loraship-scratch-") as scratch:
            prepared = prepare_merge(base.folder, adapter.folder, dtype=self._out_dtype(),
                                     allow_pickle=job.allow_pickle, scratch=Path(scratch),
                                     keep_code=job.trust_remote_code)  # fmt: skip
            if job.requantize:
                prepared = prepared.requantized()
            layout = shard_layout(prepared.plan, job.shard_size)
            feed = None
            if downloads:
                by_name = {t.name: t for t in prepared.plan.tensors}
                uses = [p.name for ts in layout.values() for t in ts for p in sorted(input_files(t, by_name))
                        if p.parent == base.folder and p.name in downloads]  # fmt: skip
                order = list(dict.fromkeys([*uses, *downloads]))
                assert base.state is not None
                feed = BaseFeed(self._hub(), base.state, base.folder, order,
                                window=len(order) + 1 if keep else BASE_WINDOW)  # fmt: skip
            stream = ShardStream(prepared, layout, feed, check=spec.enabled and not keep,
                                 upload=self._stream_upload(keep), keep=keep)  # fmt: skip
            self.log(f"Merging into {staging}, shard by shard" + (", uploading each once checked" if stream.upload
                                                                   else "") + " ...")  # fmt: skip
            stopped = False
            try:
                result = execute(prepared, staging, max_shard_size=job.shard_size, overwrite=True,
                                 progress=self.progress, hooks=stream)  # fmt: skip
            except StreamStopped:
                if not stream.check:
                    raise
                stopped = True  # a shard failed its check: the report below says which, and why
            finally:
                stream.close()
                if feed is not None:
                    feed.close()
        self.streamed = stream.result
        if keep or not spec.enabled:
            self.stage("Verify")
            return result, self._verify(base, adapter, staging)
        from loraship.check.verify import raise_if_failed, render_text, streamed_report

        self.stage("Verify")
        labels = (base.label, adapter.label, self.job.output)
        report = streamed_report(prepared, stream.result.weights, stream.result.tensors, stream.result.library,
                                 stream.result.shards, labels, stopped=stopped)  # fmt: skip
        self.log(render_text(report))
        raise_if_failed(report)
        assert not stopped
        return result, report

    def _stream_upload(self, keep: bool) -> tuple[Hub, str, bool] | None:
        """Where a streaming run uploads its shards as they are checked, if anywhere."""
        repo_id = self.target.repo_id
        if repo_id is None or self.dry_run:
            return None
        hub = self._hub()
        if hub.head(repo_id) is None:
            if keep:  # the output check runs on the whole model: a new repo is made once it passed
                return None
            self.created = hub.create_empty(repo_id, private=self.job.private)
            self.log(f"Created {hub.url(repo_id)} empty, to upload each shard once it is checked; nothing is "
                     "committed until every shard passed, and the repo is deleted again if the run fails.")  # fmt: skip
        return (hub, repo_id, self.job.publish.mode == "pr")

    # -- stages

    def _staging(self) -> Path:
        if self.target.is_local:
            assert self.target.path is not None
            final = self.target.path
            if final.is_dir() and any(final.iterdir()) and not self.overwrite and not self.dry_run:
                raise OutputError(
                    f"The output folder `{final}` exists and is not empty.",
                    fix="Pass --overwrite to replace it, or choose another `output: dir:...`.",
                )
            parent = final.resolve().parent
            try:
                parent.mkdir(parents=True, exist_ok=True)
                probe = Path(tempfile.mkdtemp(prefix=f".{final.name}.loraship-staging-", dir=parent))
                probe.chmod(0o777 & ~current_umask())
            except OSError as e:
                raise OutputError(
                    f"The output folder `{final}` cannot be written: {e.strerror or e}.",
                    fix="Choose an `output: dir:...` in a folder you can write to.",
                ) from e
            return probe / "merged"
        return self.work / "merged"

    def _verify(self, base: _Input, adapter: _Input, merged: Path) -> Any:
        spec = self.job.verify
        if not spec.enabled:
            self.log("Verification is turned off for this job.")
            return None
        self.log("Verifying the merged model against base + adapter ...")
        from loraship.check.outputs import load_prompts
        from loraship.check.verify import raise_if_failed, render_text, verify

        prompts = spec.prompts
        if isinstance(prompts, str):
            prompts = load_prompts(Path(prompts))
        report = verify(
            base.folder, adapter.folder, merged, outputs=spec.outputs, prompts=prompts, device=spec.device,
            dtype=spec.dtype, threshold_overrides=spec.threshold_overrides(), weight_atol=spec.weight_atol,
            trust_remote_code=self.job.trust_remote_code, allow_pickle=self.job.allow_pickle,
            labels=(base.label, adapter.label, self.job.output), progress=self.progress,
            max_memory=spec.max_memory_bytes,
        )  # fmt: skip
        self.log(render_text(report))
        raise_if_failed(report)
        return report

    def _card(self, base: _Input, adapter: _Input, staging: Path, result: Any, report: Any, key: str) -> str:
        from loraship.run.card import CardInputs, render_card

        spec = result.prepared.adapter
        adapter_card = adapter.folder / CARD_NAME
        config = json.loads((staging / "config.json").read_text())
        dtypes = sorted({CODE_NAMES.get(t.dtype, t.dtype) for t in result.prepared.plan.tensors})
        inputs = CardInputs(
            repo_id=self.target.repo_id or (self.target.path.name if self.target.path else "merged"),
            base=base.name, adapter=adapter.name, base_sha=base.state.sha if base.state else None,
            adapter_sha=adapter.state.sha if adapter.state else None, base_is_hub=base.state is not None,
            adapter_is_hub=adapter.state is not None,
            base_card=base.state.card_data if base.state else _card_metadata(base.folder / CARD_NAME),
            adapter_card=adapter.state.card_data if adapter.state else _card_metadata(adapter_card),
            adapter_text=adapter_card.read_text() if adapter_card.is_file() else "", spec=spec, config=config,
            dtype=", ".join(dtypes) + _requantized(result.prepared.plan, result.prepared.base_config),
            job_yaml=self.job.to_yaml(), job_hash=self.job.job_hash(),
            verification=report.to_markdown() if report else None, tags=self.job.card.tags,
            language=self.job.card.language, extra=self.job.card.extra, notes=result.prepared.notes,
            has_tokenizer=any((staging / name).is_file() for name in TOKENIZER_FILES),
            endpoint=self.hub.endpoint if self.hub else "https://huggingface.co",
        )  # fmt: skip
        return render_card(inputs)

    def _move_into_place(self, staging: Path) -> Path:
        assert self.target.path is not None
        final = self.target.path
        try:
            if final.exists():
                trash = staging.parent / "old"
                os.replace(final, trash)
            os.replace(staging, final)
        except OSError as e:
            raise OutputError(f"Cannot move the merged model into `{final}`: {e.strerror or e}.",
                              fix="Check the folder's permissions and run again.") from e  # fmt: skip
        shutil.rmtree(staging.parent, ignore_errors=True)
        return final

    def _start_preupload(self, staging: Path, weight_files: Sequence[str]) -> PreUpload | None:
        """Upload the weights while they are verified, when the output repo already exists (a new one
        is created only once verification passed): nothing is visible until the commit."""
        repo_id = self.target.repo_id
        if repo_id is None or self.dry_run or not self.job.verify.enabled or self._hub().head(repo_id) is None:
            return None
        shards = [f for f in weight_files if f.endswith(".safetensors")]
        self.log(f"Uploading {len(shards)} weight file(s) while verifying (no commit until verification passes) ...")
        return self._hub().preupload(repo_id, staging, shards, create_pr=self.job.publish.mode == "pr")

    def _publish(self, staging: Path, base: _Input, key: str, done: RunResult) -> RunResult:
        hub = self._hub()
        repo_id = self.target.repo_id or ""
        reuse: dict[str, Any] = {}
        if self.streamed is not None:
            reuse = reusable(self.streamed, staging)
            if self.streamed.upload_problem:
                self.log(f"The upload while merging did not finish ({self.streamed.upload_problem}): uploading now.")
        elif self.preupload is not None:
            reuse = self.preupload.wait()
            if self.preupload.problem:
                self.log(f"The upload during verification did not finish ({self.preupload.problem}): uploading now.")
        parent = hub.head(repo_id)
        found = hub.find_publication(repo_id, key)  # again: a run beside this one may have finished first
        if found is not None:
            return self._already(found, key, (done.base, done.adapter))
        gated = self._gating(base)
        title = commit_title(self.job, base, key)
        description = (
            f"Merged and verified by loraship {__version__}.\n\n"
            f"- base: {done.base}\n- adapter: {done.adapter}\n- job hash: {self.job.job_hash()}\n"
            f"- verification: {'passed' if done.verified else 'not run'}\n"
        )
        self.stage("Publish")
        self.log(f"Publishing to {hub.url(repo_id)} ...")
        try:
            publication = hub.publish(
                staging, repo_id, private=self.job.private, gated=gated, title=title, description=description,
                create_pr=self.job.publish.mode == "pr", tag=self.job.publish.tag, parent_commit=parent, reuse=reuse,
            )  # fmt: skip
        except CommitConflict:
            # Someone committed first: maybe this very merge (an earlier attempt whose reply was lost).
            found = hub.find_publication(repo_id, key)
            if found is None:
                raise
            return self._already(found, key, (done.base, done.adapter))
        return replace(done, status="published", repo_url=publication.repo_url, commit_sha=publication.commit_sha,
                       tag=publication.tag, pr_url=publication.pr_url,
                       message=f"Published {publication.link}.")  # fmt: skip

    def _gating(self, base: _Input) -> str | None:
        mode = self.job.publish.gated
        if mode == "off":
            return None
        if mode in ("auto", "manual"):
            return mode
        gated = base.state.gated if base.state else False
        return str(gated) if gated in ("auto", "manual") else None

    def _already(self, found: Publication, key: str, labels: tuple[str, str]) -> RunResult:
        tag = self.job.publish.tag
        message = f"Already published at {found.link}: nothing to do."
        if tag and found.commit_sha:  # a run stopped between its commit and its tag leaves the tag to us
            self._hub().ensure_tag(self.target.repo_id or "", tag, found.commit_sha)
            message = f"Already published at {found.link} (tag `{tag}`): nothing to do."
        self.log(message)
        return RunResult(job=self.job.name, status="already-published", output=self.job.output, base=labels[0],
                         adapter=labels[1], provenance=key, repo_url=found.repo_url, commit_sha=found.commit_sha,
                         tag=tag if found.commit_sha else None, pr_url=found.pr_url, message=message)  # fmt: skip


# --------------------------------------------------------------------------- pure helpers


def provenance_key(job: MergeJob, base_sha: str | None, adapter_sha: str | None) -> str:
    """What identifies one publication: job hash, base SHA, adapter SHA (short)."""
    return f"[loraship {job.job_hash()} base {(base_sha or 'local')[:10]} adapter {(adapter_sha or 'local')[:10]}]"


def commit_title(job: MergeJob, base: _Input, key: str) -> str:
    if job.publish.commit_message:
        return f"{job.publish.commit_message} {key}"
    adapter = job.adapter_source.repo_id or "a local adapter"
    return f"Merge {adapter} into {base.name} {key}"


def adapter_files(files: tuple[str, ...], *, allow_pickle: bool) -> list[str]:
    """The adapter repo's files worth downloading: config, weights, tokenizer, chat template, card."""
    wanted = {ADAPTER_CONFIG, WEIGHTS_NAME, CARD_NAME, *TOKENIZER_FILES, *CHAT_TEMPLATE_FILES}
    if allow_pickle and WEIGHTS_NAME not in files:
        wanted.add(PICKLE_NAME)
    chosen = [f for f in files if f in wanted or f.startswith("additional_chat_templates/")]
    return chosen


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


def _card_metadata(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    from huggingface_hub import ModelCard

    try:
        return dict(ModelCard.load(path).data.to_dict())
    except Exception:  # a malformed card is not a reason to fail the merge
        return {}


def _requantized(plan: Any, config: Mapping[str, Any]) -> str:
    """What the card's Weights row adds for a ``--requantize`` merge."""
    if not any(t.requantize for t in plan.tensors):
        return ""
    from loraship.engine.quantized import describe

    return (
        f"; the weights the adapter changes were quantized again to the base's {describe(config)} by loraship "
        "(lossy: see Verification for how much of the adapter's effect survives)"
    )
