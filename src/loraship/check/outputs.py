"""Output-level verification: run base + adapter (PEFT, unmerged) and the merged folder (plain
transformers), one model in memory at a time, on the same inputs, and compare their outputs.

For causal language models the reference also generates a greedy continuation; the merged model
is then run over prompt + that continuation in one pass: its greedy generation is identical as long
as its argmax equals the reference's token at every step.
"""

from __future__ import annotations

import contextlib
import gc
import json
import sys
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from loraship.check.metrics import GenerationAgreement, OutputStats, combine, compare_outputs, greedy_agreement
from loraship.engine import quantized
from loraship.engine.conversions import PerExpertLora, peft_conversion_problem
from loraship.engine.planner import vocab_size
from loraship.errors import InputError, UnsupportedError, first_line
from loraship.text import human_bytes

#: Default prompts: short, varied (prose, code, instructions, lists, a question).
DEFAULT_PROMPTS: tuple[str, ...] = (
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Translate to German: The weather is nice today.",
    "List three prime numbers and explain why they are prime.",
    "Q: Why is the sky blue?\nA:",
)
Prompt = str | list[dict[str, str]]


@dataclass(frozen=True)
class Thresholds:
    """When outputs count as the same. Defaults per dtype: :data:`THRESHOLDS`.

    The merge error is measured relative to the adapter's own effect on the outputs (base + adapter
    vs the base alone): absolute KL values depend on how peaked a model's outputs are, the ratio
    does not. A merge that changes nothing scores 1.

    Attributes:
        max_error_ratio: Largest allowed mean KL(reference ‖ merged) / mean KL(reference ‖ base);
            for outputs that are not logits (hidden states), the same ratio of mean absolute differences.
        min_top1: Smallest allowed share of positions where merged and reference pick the same top-1.
        generation_tokens: New tokens the merged model must generate as the reference does.
        tie_fraction: A greedy difference is a tie (allowed) when the reference's two logits are
            within this fraction of the standard deviation of its logits at that step.
    """

    max_error_ratio: float
    min_top1: float
    generation_tokens: int = 32
    tie_fraction: float = 0.0


#: Chosen from benchmarks/verify_calibration.py on real-size layers (README, "Verification").
THRESHOLDS: dict[str, Thresholds] = {
    "float32": Thresholds(max_error_ratio=0.01, min_top1=0.95, tie_fraction=0.01),
    "bfloat16": Thresholds(max_error_ratio=0.2, min_top1=0.9, tie_fraction=0.1),
    "float16": Thresholds(max_error_ratio=0.1, min_top1=0.9, tie_fraction=0.05),
}
#: A merged model requantized to the base's FP8 (``--requantize``) is lossy by design: at least half
#: of the adapter's effect on the outputs must survive; top-1 and generation are reported only.
REQUANTIZED_MAX_ERROR_RATIO = 0.5


@dataclass(frozen=True)
class OutputReport:
    """What the output-level comparison measured."""

    model_class: str
    device: str
    dtype: str
    inputs: str
    prompts: int
    stats: OutputStats
    effect: OutputStats
    logits: bool
    generation: tuple[GenerationAgreement, ...] = ()
    thresholds: Thresholds | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)
    #: Why PEFT's unmerged model is not base + adapter (outputs were then not compared).
    reference_problem: str | None = None
    #: The merged weights were quantized again (``--requantize``): the comparison measures what survives.
    requantized: bool = False


def load_prompts(path: Path) -> list[Prompt]:
    """Prompts from a file: ``.json`` (a list of strings or message lists), ``.jsonl`` (one string,
    ``{"prompt": ...}`` or ``{"messages": [...]}`` per line), else plain text, one prompt per line.

    Raises:
        InputError: The file cannot be read, is malformed, or holds no prompts.
    """
    try:
        text = path.read_text()
    except OSError as e:
        raise InputError(
            f"Cannot read the prompts file `{path}`: {e.strerror or e}.",
            fix="Pass --prompts a readable file with one prompt per line (or JSON / JSONL).",
        ) from e
    try:
        if path.suffix == ".json":
            items: list[Any] = json.loads(text)
            if not isinstance(items, list):
                raise ValueError("not a list")
        elif path.suffix == ".jsonl":
            items = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            items = [line for line in text.splitlines() if line.strip()]
        prompts = [_prompt(item) for item in items]
    except (ValueError, KeyError, TypeError) as e:
        raise InputError(
            f"The prompts file `{path}` is not in a format loraship reads ({e}).",
            fix="Use one prompt per line, or JSON: a list of strings or of chat message lists "
            '([{"role": "user", "content": "..."}]).',
        ) from e
    if not prompts:
        raise InputError(
            f"The prompts file `{path}` holds no prompts.",
            fix="Write at least one prompt in it, or leave out --prompts to use the default prompts.",
        )
    return prompts


def _prompt(item: Any) -> Prompt:
    if isinstance(item, str):
        return item
    if isinstance(item, dict):
        if "messages" in item:
            return _prompt(item["messages"])
        return str(item["prompt"])
    if isinstance(item, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in item):
        return [{"role": str(m["role"]), "content": str(m["content"])} for m in item]
    raise ValueError(f"unexpected prompt entry {item!r:.60}")


def check_outputs(*args: Any, **kwargs: Any) -> OutputReport:
    """Compare base + adapter (PEFT, unmerged) with the merged folder (plain transformers).

    Arguments as :func:`compare`; library warnings raised while loading models are silenced (the
    report says what matters).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", UserWarning)
        return compare(*args, **kwargs)


def compare(
    base: Path,
    adapter: Path,
    merged: Path,
    *,
    prompts: Sequence[Prompt] | None = None,
    device: str = "auto",
    dtype: str = "auto",
    thresholds: Thresholds | None = None,
    overrides: Mapping[str, float | int] | None = None,
    trust_remote_code: bool = False,
    per_expert: Sequence[PerExpertLora] = (),
    progress: bool = False,
    requantized: bool = False,
    max_memory: int | None = None,
) -> OutputReport:
    """Compare base + adapter (PEFT, unmerged) with the merged folder (plain transformers).

    Args:
        per_expert: LoRAs an adapter saved under transformers v4 names on per-expert tensors: PEFT
            converts them on load, and when its conversion differs from the adapter's own math the
            outputs are not compared (the report says why).
        prompts: Prompts (strings or chat message lists); :data:`DEFAULT_PROMPTS` when None.
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``; on CUDA models are placed with
            accelerate's ``device_map="auto"`` (GPUs first, then CPU offload).
        dtype: ``auto`` (the merged model's dtype) or a dtype name.
        thresholds: Replaces the dtype's defaults (:data:`THRESHOLDS`); ``overrides`` change single fields.
        trust_remote_code: Allow model classes defined by code in the model repo.
        progress: Say on stderr which model is loading, and show a bar over the prompts of each pass.
        requantized: The merged folder holds requantized FP8 weights (``--requantize``): the error
            ratio's limit is :data:`REQUANTIZED_MAX_ERROR_RATIO`, top-1 and generation are reported.
        max_memory: Bytes of the check's device (RAM on CPU, each GPU's memory on CUDA) the weights
            may take; the layers that do not fit stay in the safetensors files on disk and are read
            as they run (accelerate's disk offload, in place). None: each model is loaded whole.

    Raises:
        InputError: The model class cannot be loaded (e.g. it needs remote code).
        UnsupportedError: ``max_memory`` with an adapter PEFT cannot run on an offloaded model.
    """
    import torch

    config = json.loads((merged / "config.json").read_text())
    cls = model_class(config, merged, trust_remote_code=trust_remote_code)
    run_dtype = _run_dtype(dtype, config)
    run_device = "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    limits = thresholds or THRESHOLDS.get(run_dtype, THRESHOLDS["bfloat16"])
    if requantized and thresholds is None:
        limits = replace(limits, max_error_ratio=REQUANTIZED_MAX_ERROR_RATIO)
    if overrides:
        limits = replace(limits, **overrides)  # type: ignore[arg-type]
    load: dict[str, Any] = {"dtype": getattr(torch, run_dtype), "trust_remote_code": trust_remote_code}
    if run_device == "cuda":
        load["device_map"] = "auto"  # accelerate: fill the GPU(s), then offload to CPU
    notes: list[str] = []
    offload = contextlib.ExitStack()
    if max_memory is not None:
        offload_check_supported(adapter)
        limits_map: dict[int | str, int] = {"cpu": max_memory}
        if run_device == "cuda":
            limits_map.update({i: max_memory for i in range(torch.cuda.device_count())})
        folder = offload.enter_context(tempfile.TemporaryDirectory(prefix="loraship-offload-"))
        load.update(device_map="auto", max_memory=limits_map, offload_folder=folder)
        notes.append(
            f"Both models ran with at most {human_bytes(max_memory)} of weights in memory (max_memory); the other "
            "layers were read from their safetensors files as they ran (accelerate's disk offload)."
        )

    # Reference: base + adapter through PEFT, unmerged.
    base_config = json.loads((base / "config.json").read_text())
    head: dict[str, Any] = {k: config[k] for k in ("id2label", "label2id") if k in config and k not in base_config}
    if "id2label" in head:  # the adapter brings a classifier head: the reference gets one of that size
        head["num_labels"] = len(head["id2label"])
    with offload:
        return _compare(cls, base, adapter, merged, config, base_config, head, load, limits, notes, prompts,
                        trust_remote_code=trust_remote_code, per_expert=per_expert, progress=progress,
                        requantized=requantized, run_device=run_device, run_dtype=run_dtype,
                        offloaded=max_memory is not None)  # fmt: skip


def peft_load_problem(model: Any, adapter: Path, *, skip: frozenset[str] = frozenset()) -> str | None:
    """How PEFT's loaded adapter differs from the adapter file (None when it holds every tensor as saved).

    PEFT loads an adapter's tensors through the model's own checkpoint renames, and may miss some: Inkling 2's
    ``k_sconv.weight_proj`` LoRA is left at its initial values, a transformers v4 Mixtral adapter's LoRA of the
    router (``block_sparse_moe.gate``, now ``mlp.gate``) is dropped. Its unmerged model is then not base + adapter.
    ``skip``: tensors PEFT converts on load (per-expert LoRAs of a v4 adapter), checked on their own.
    """
    import torch
    from peft import get_peft_model_state_dict
    from safetensors import safe_open

    path = adapter / "adapter_model.safetensors"
    if not path.is_file():
        return None
    loaded = get_peft_model_state_dict(model)
    missing: list[str] = []
    with safe_open(str(path), "pt") as f:
        for key in f.keys():  # noqa: SIM118 - a safetensors file, not a dict
            if key in skip:
                continue
            got = loaded.get(key)
            if got is None or got.device.type == "meta":
                if got is None and ".lora_" in key:
                    missing.append(key)
                continue
            want = f.get_tensor(key)
            if got.shape != want.shape or not torch.allclose(got.float().cpu(), want.float(), rtol=1e-2, atol=1e-3):
                missing.append(key)
    if not missing:
        return None
    return (
        f"PEFT does not load `{missing[0]}`"
        + (f" (nor {len(missing) - 1} more adapter tensor(s))" if len(missing) > 1 else "")
        + " from the adapter file as saved, so its unmerged model leaves that part of the adapter out"
    )


def _compare(
    cls: Any,
    base: Path,
    adapter: Path,
    merged: Path,
    config: Mapping[str, Any],
    base_config: Mapping[str, Any],
    head: Mapping[str, Any],
    load: Mapping[str, Any],
    limits: Thresholds,
    notes: list[str],
    prompts: Sequence[Prompt] | None,
    *,
    trust_remote_code: bool,
    per_expert: Sequence[PerExpertLora],
    progress: bool,
    requantized: bool,
    run_device: str,
    run_dtype: str,
    offloaded: bool,
) -> OutputReport:
    import torch
    from peft import PeftModel
    from tqdm.auto import tqdm

    def step(message: str) -> None:
        if progress:
            print(message, file=sys.stderr, flush=True)

    def prompts_bar(items: list[dict[str, Any]], desc: str) -> Any:
        return tqdm(items, desc=desc, unit="prompt", disable=not progress, leave=False)

    step(f"Loading the base with the adapter (PEFT, unmerged) on {run_device} in {run_dtype}")
    reference = cls.from_pretrained(str(base), **load, **head, **loader_kwargs(base_config))
    vocab = vocab_size(config)
    if vocab is not None and vocab != vocab_size(base_config) and hasattr(reference, "resize_token_embeddings"):
        if offloaded:
            raise UnsupportedError(
                "The adapter resizes the token embeddings, which the bounded-memory output check (max_memory) cannot "
                "do on a model whose layers stay on disk.",
                fix=OFFLOAD_FIX,
            )
        reference.resize_token_embeddings(vocab, mean_resizing=False)
    reference = _peft_offloaded(reference, adapter) if offloaded else PeftModel.from_pretrained(reference, str(adapter))
    reference = reference.eval()
    if per_expert:
        tolerance = 1e-4 if run_dtype == "float32" else 2e-2  # PEFT rounds the delta to the run dtype
        problem = peft_conversion_problem(reference, per_expert, tolerance=tolerance)
        if problem is not None:
            del reference
            _free()
            none = OutputStats(0, 0.0, 0.0)
            return OutputReport(cls.__name__, run_device, run_dtype, "none", 0, none, none, True, thresholds=limits,
                                reference_problem=problem)  # fmt: skip
    converted = frozenset(t.name for lora in per_expert for t in (lora.a, lora.b))  # checked above
    problem = None if offloaded else peft_load_problem(reference, adapter, skip=converted)
    if problem is not None:
        del reference
        _free()
        none = OutputStats(0, 0.0, 0.0)
        return OutputReport(cls.__name__, run_device, run_dtype, "none", 0, none, none, True, thresholds=limits,
                            reference_problem=problem)  # fmt: skip
    inputs, description = _inputs(reference, merged, config, prompts, trust_remote_code=trust_remote_code)
    if config.get("is_encoder_decoder"):
        inputs = [_with_decoder_inputs(item, reference.config) for item in inputs]
        description += ", with a fixed decoder prefix"
    causal = _is_causal(cls, config)
    ref_outputs: list[torch.Tensor] = []
    base_outputs: list[torch.Tensor] = []
    continuations: list[torch.Tensor] = []
    logits = True
    with torch.no_grad():
        for i, item in enumerate(prompts_bar(list(inputs), "Base + adapter outputs")):
            if causal and limits.generation_tokens > 0:
                ids = item["input_ids"]
                new = reference.generate(
                    **_to(item, reference),
                    max_new_tokens=limits.generation_tokens,
                    min_new_tokens=limits.generation_tokens,
                    do_sample=False,
                    pad_token_id=_pad_id(reference.config),
                )
                continuation = new[0, ids.shape[1] :].cpu()
                inputs[i] = item = {"input_ids": torch.cat([ids, continuation[None]], dim=1)}
                continuations.append(continuation)
            out, logits = _main_output(reference(**_to(item, reference)))
            ref_outputs.append(out.float().cpu())
            with reference.disable_adapter():  # the base alone: the yardstick for the adapter's effect
                base_outputs.append(_main_output(reference(**_to(item, reference)))[0].float().cpu())
    del reference
    _free()

    # Candidate: the merged folder with plain transformers; PEFT plays no part in this load.
    step(f"Loading the merged model (plain transformers) on {run_device} in {run_dtype}")
    candidate = cls.from_pretrained(str(merged), **load, **loader_kwargs(config)).eval()
    stats: list[Any] = []
    effect = [compare_outputs(r, b, logits=logits) for r, b in zip(ref_outputs, base_outputs, strict=True)]
    generation: list[GenerationAgreement] = []
    with torch.no_grad():
        for i, item in enumerate(prompts_bar(inputs, "Merged outputs")):
            out, _ = _main_output(candidate(**_to(item, candidate)))
            cand = out.float().cpu()
            stats.append(compare_outputs(ref_outputs[i], cand, logits=logits))
            if continuations:
                predicting = slice(-len(continuations[i]) - 1, -1)  # positions predicting each new token
                agreement = greedy_agreement(
                    ref_outputs[i][0, predicting],
                    cand[0, predicting],
                    continuations[i],
                    tie_fraction=limits.tie_fraction,
                )
                generation.append(agreement)
    del candidate
    _free()
    if not causal:
        notes.append("not a causal language model: outputs compared, no generation")
    return OutputReport(
        model_class=cls.__name__,
        device=run_device,
        dtype=run_dtype,
        inputs=description,
        prompts=len(inputs),
        stats=combine(stats),
        effect=combine(effect),
        logits=logits,
        generation=tuple(generation),
        thresholds=limits,
        notes=tuple(notes),
        requantized=requantized,
    )


OFFLOAD_FIX = (
    "Run the output check without `max_memory` on a machine whose memory holds one model, or check the weights only "
    "(`verify: {outputs: false}`, `loraship verify --weights-only`: every merged tensor is still compared bit for bit "
    "with base + adapter)."
)


def offload_check_supported(adapter: Path) -> None:
    """Refuse, before loading anything, an adapter the bounded-memory check cannot run through PEFT:
    one whose modules PEFT builds from the base's weights (DoRA's norms, copies of whole modules,
    trained token rows), which stay on disk there.

    Raises:
        UnsupportedError: Naming what the adapter uses.
    """
    config = json.loads((adapter / "adapter_config.json").read_text())
    found = [
        what
        for what, used in (
            (f"a PEFT type other than LoRA ({config.get('peft_type')})", config.get("peft_type", "LORA") != "LORA"),
            ("DoRA (use_dora)", bool(config.get("use_dora"))),
            ("modules_to_save", bool(config.get("modules_to_save"))),
            ("trainable_token_indices", bool(config.get("trainable_token_indices"))),
        )
        if used
    ]
    if found:
        raise UnsupportedError(
            f"The bounded-memory output check (max_memory) runs plain LoRA adapters; this one uses {', '.join(found)}, "
            "whose PEFT modules are built from base weights that stay on disk there.",
            fix=OFFLOAD_FIX,
        )


def _peft_offloaded(model: Any, adapter: Path) -> Any:
    """PEFT's unmerged model around a base whose layers accelerate keeps on disk.

    PeftModel.from_pretrained would dispatch the whole model again (and fail on the offloaded
    meta tensors), and it creates the LoRA factors on their base layer's device, meta for an
    offloaded layer. So the adapter is attached with the device map hidden, the factors are made
    real on the CPU, and PEFT's own ``set_peft_model_state_dict`` loads them; the base layers keep
    their offload hooks, and PEFT's forward runs unchanged.

    Raises:
        UnsupportedError: A LoRA factor stayed unloaded.
    """
    from peft import PeftModel
    from peft.utils import load_peft_weights, set_peft_model_state_dict

    device_map = model.__dict__.pop("hf_device_map", None)
    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter))
    finally:
        if device_map is not None:
            model.hf_device_map = device_map
    for name, module in peft_model.named_modules():
        if any(part.startswith("lora_") for part in name.split(".")) and any(
            t.is_meta for t in module.parameters(recurse=False)
        ):
            module.to_empty(device="cpu", recurse=False)
    loaded = set_peft_model_state_dict(peft_model, load_peft_weights(str(adapter), device="cpu"))
    left = [n for n, t in peft_model.named_parameters() if "lora_" in n and t.is_meta]
    left += list(getattr(loaded, "unexpected_keys", ()))
    if left:
        raise UnsupportedError(
            f"PEFT did not load every LoRA factor onto the model whose layers stay on disk ({', '.join(left[:3])}).",
            fix=OFFLOAD_FIX,
        )
    return peft_model


def model_class(config: Mapping[str, Any], folder: Path, *, trust_remote_code: bool) -> Any:
    """The transformers class named by config.json's ``architectures``.

    Raises:
        InputError: transformers has no such class and remote code is not allowed.
    """
    import transformers

    names = list(config.get("architectures") or [])
    for name in names:
        if hasattr(transformers, name):
            return getattr(transformers, name)
    if trust_remote_code and config.get("auto_map"):
        auto_map = config["auto_map"]
        for auto in ("AutoModelForCausalLM", "AutoModelForSequenceClassification", "AutoModel"):
            if auto in auto_map:
                return getattr(transformers, auto)
    shown = names[0] if names else "(config.json names no architecture)"
    raise InputError(
        f"transformers cannot load the model class {shown} of `{folder}` without running code from the model repo.",
        fix="If you trust the base model's repository, pass --trust-remote-code: transformers then imports "
        "and runs the Python files the repo ships (auto_map in config.json), with your permissions.",
    )


def _is_causal(cls: Any, config: Mapping[str, Any]) -> bool:
    name = cls.__name__
    return not config.get("is_encoder_decoder") and (name.endswith("ForCausalLM") or name.endswith("LMHeadModel"))


def _run_dtype(dtype: str, config: Mapping[str, Any]) -> str:
    if dtype != "auto":
        return dtype
    name = str(config.get("dtype") or config.get("torch_dtype") or "float32")
    return name if name in THRESHOLDS else "float32"


def _pad_id(config: Any) -> int:
    for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
        value = getattr(config, name, None)
        if isinstance(value, list):
            value = value[0] if value else None
        if isinstance(value, int):
            return value
    return 0


def _inputs(
    model: Any, merged: Path, config: Mapping[str, Any], prompts: Sequence[Prompt] | None, *, trust_remote_code: bool
) -> tuple[list[dict[str, Any]], str]:
    """The model's inputs: tokenized prompts (chat template applied), or fixed random inputs."""
    import torch

    main = getattr(model, "main_input_name", "input_ids")
    g = torch.Generator().manual_seed(0)
    if main == "pixel_values":
        size = int(config.get("image_size") or 64)
        channels = int(config.get("num_channels") or 3)
        return [{"pixel_values": torch.randn(2, channels, size, size, generator=g)}], "fixed random images"
    if main == "input_features":  # speech encoders (Whisper): log-mel frames the encoder accepts
        mels = int(config.get("num_mel_bins") or 80)
        frames = 2 * int(config.get("max_source_positions") or 1500)
        return [{"input_features": torch.randn(1, mels, frames, generator=g)}], "fixed random audio features"
    if main == "input_values":
        return [{"input_values": torch.randn(2, 4000, generator=g)}], "fixed random audio"
    tokenizer = _tokenizer(merged, trust_remote_code=trust_remote_code)
    if tokenizer is None:
        vocab = vocab_size(config) or 1000
        count = len(prompts) if prompts else len(DEFAULT_PROMPTS)
        items = [{"input_ids": torch.randint(0, vocab, (1, 16), generator=g)} for _ in range(count)]
        return items, "fixed random token ids (the model has no tokenizer)"
    items = []
    template = bool(getattr(tokenizer, "chat_template", None))
    for prompt in prompts or DEFAULT_PROMPTS:
        if template:
            messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
            ids = ids["input_ids"] if isinstance(ids, Mapping) else ids
        else:
            text = prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)
            ids = tokenizer(text, return_tensors="pt")["input_ids"]
        items.append({"input_ids": ids})
    source = "your prompts" if prompts else "the default prompts"
    return items, source + (" with the chat template" if template else "")


def _tokenizer(folder: Path, *, trust_remote_code: bool) -> Any:
    """The merged folder's tokenizer, or None when it has none.

    Raises:
        InputError: It needs its own Python code (``auto_map``) and that is not allowed, or it does not load.
    """
    from loraship.engine.repo_files import TOKENIZER_FILES

    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        return None
    settings_path = folder / "tokenizer_config.json"
    try:
        settings = json.loads(settings_path.read_text()) if settings_path.is_file() else {}
    except (ValueError, RecursionError) as e:
        raise InputError(f"`{settings_path}` is not valid JSON.", fix="Fix or remove the file.") from e
    if isinstance(settings, dict) and settings.get("auto_map") and not trust_remote_code:
        raise InputError(
            f"The tokenizer in `{folder}` is defined by Python code in the repo (auto_map in tokenizer_config.json), "
            "and running it was not allowed.",
            fix="If you trust the repo, pass --trust-remote-code (`trust_remote_code: true` in loraship.yaml); "
            "otherwise verify with --weights-only.",
        )
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    except Exception as e:  # transformers raises many kinds for a tokenizer it cannot build
        first = first_line(e)
        raise InputError(
            f"The tokenizer in `{folder}` does not load: {first}",
            fix="Fix the tokenizer files (try AutoTokenizer.from_pretrained on the folder), or verify with "
            "--weights-only.",
        ) from e


def _with_decoder_inputs(item: dict[str, Any], model_config: Any) -> dict[str, Any]:
    """An encoder-decoder needs decoder inputs: its start token, then a few fixed token ids."""
    import torch

    start = getattr(model_config, "decoder_start_token_id", None)
    if start is None:
        start = _pad_id(model_config)
    vocab = int(getattr(model_config, "vocab_size", 0) or 0) or 2
    g = torch.Generator().manual_seed(1)
    follow = torch.randint(0, vocab, (1, 7), generator=g)
    batch = next(iter(item.values())).shape[0]
    ids = torch.cat([torch.full((1, 1), int(start)), follow], dim=1).expand(batch, -1)
    return {**item, "decoder_input_ids": ids}


def _to(item: Mapping[str, Any], model: Any) -> dict[str, Any]:
    device = _input_device(model)
    return {k: v.to(device) if device is not None else v for k, v in item.items()}


def _input_device(model: Any) -> Any:
    """Where the model's inputs go: its device, or for a model accelerate placed (some layers on disk,
    whose parameters are meta tensors) the first device of its map that is not the disk."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    placed = [d for d in (getattr(inner, "hf_device_map", None) or {}).values() if d != "disk"]
    if placed:
        first = placed[0]
        return first if first == "cpu" or isinstance(first, str) else f"cuda:{first}"
    if getattr(inner, "hf_device_map", None):  # every layer on disk: they run on the CPU
        return "cpu"
    return getattr(model, "device", None)


def _main_output(out: Any) -> tuple[Any, bool]:
    value = getattr(out, "logits", None)
    if value is not None:
        return value, True
    return out.last_hidden_state, False


def _free() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def loader_kwargs(config: Mapping[str, Any]) -> dict[str, Any]:
    """What ``from_pretrained`` needs to load this base dequantized (the output check's reference)."""
    if quantized.method(config) == "fp8":
        from transformers import FineGrainedFP8Config

        return {"quantization_config": FineGrainedFP8Config(dequantize=True)}
    if quantized.method(config) == "mxfp4":
        from transformers.utils.quantization_config import Mxfp4Config

        return {"quantization_config": Mxfp4Config(dequantize=True)}
    return {}
