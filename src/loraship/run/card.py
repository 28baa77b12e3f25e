"""The merged model's card (README.md). Pure: values in, the card's text out.

Metadata: ``base_model`` with ``base_model_relation: finetune`` (the merged model sits under its
base in the Hub's model tree), the base's license (with ``license_name`` / ``license_link`` when it
is ``other``), ``library_name: transformers``, ``pipeline_tag``, tags, the adapter card's datasets
and languages, and loraship's provenance (base and adapter SHAs, job hash), which reruns use to
recognise what is already published. Body: what the model is, a provenance table, the
verification report, a usage snippet, how to reproduce it, and the adapter card's description.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from loraship import __version__
from loraship.engine.adapter import AdapterSpec, settings_summary

# transformers' auto-model mappings, most specific task first, with the Hub's pipeline tag for each:
# an architecture takes the first mapping that lists it (Gemma3ForConditionalGeneration is in the
# causal-LM mapping too, but it reads images: image-text-to-text).
_TASKS = (
    ("SPEECH_SEQ_2_SEQ", "automatic-speech-recognition", "AutoModelForSpeechSeq2Seq"),
    ("CTC", "automatic-speech-recognition", "AutoModelForCTC"),
    ("IMAGE_TEXT_TO_TEXT", "image-text-to-text", "AutoModelForImageTextToText"),
    ("VISUAL_QUESTION_ANSWERING", "visual-question-answering", "AutoModelForVisualQuestionAnswering"),
    ("SEQ_TO_SEQ_CAUSAL_LM", "text2text-generation", "AutoModelForSeq2SeqLM"),
    ("CAUSAL_LM", "text-generation", "AutoModelForCausalLM"),
    ("SEQUENCE_CLASSIFICATION", "text-classification", "AutoModelForSequenceClassification"),
    ("TOKEN_CLASSIFICATION", "token-classification", "AutoModelForTokenClassification"),
    ("QUESTION_ANSWERING", "question-answering", "AutoModelForQuestionAnswering"),
    ("MASKED_LM", "fill-mask", "AutoModelForMaskedLM"),
    ("IMAGE_CLASSIFICATION", "image-classification", "AutoModelForImageClassification"),
    ("AUDIO_CLASSIFICATION", "audio-classification", "AutoModelForAudioClassification"),
    ("TEXT_TO_WAVEFORM", "text-to-speech", "AutoModelForTextToWaveform"),
    ("OBJECT_DETECTION", "object-detection", "AutoModelForObjectDetection"),
)


@dataclass(frozen=True)
class CardInputs:
    """Everything the card says, gathered by the pipeline.

    Attributes:
        repo_id: Where the merged model lives (a Hub repo id, or a folder name for ``dir:`` outputs).
        base: The base's repo id, or a local base's name (folder name and config hash, never a path);
            ``base_sha`` its commit when from the Hub.
        adapter: The adapter's repo id (or local name, likewise); ``adapter_sha`` likewise.
        base_repo: For a local base, the Hub repo it is a copy of, as its adapter's config (or its
            config.json) names it: the ``base_model`` metadata; None leaves ``base_model`` out.
        base_card: The base card's metadata (license, pipeline_tag...).
        adapter_card: The adapter card's metadata (datasets, language...).
        adapter_text: The adapter card's body (without its metadata block).
        spec: The adapter, as parsed for the merge.
        config: The merged model's config.json.
        dtype: The merged weights' dtype name.
        job_yaml: The job, as loraship.yaml would hold it.
        job_hash: The job's hash (provenance).
        verification: The verification report in Markdown, or None when not verified.
        tags: Extra tags from the job; ``language`` extra languages; ``extra`` extra text.
        notes: Notes from the merge plan (untied embeddings, resized vocabulary...).
        has_tokenizer: Whether the merged folder holds a tokenizer.
    """

    repo_id: str
    base: str
    adapter: str
    spec: AdapterSpec
    config: Mapping[str, Any]
    dtype: str
    job_yaml: str
    job_hash: str
    base_sha: str | None = None
    adapter_sha: str | None = None
    base_is_hub: bool = True
    base_repo: str | None = None
    adapter_is_hub: bool = True
    base_card: Mapping[str, Any] = field(default_factory=dict)
    adapter_card: Mapping[str, Any] = field(default_factory=dict)
    adapter_text: str = ""
    verification: str | None = None
    tags: Sequence[str] = ()
    language: Sequence[str] = ()
    extra: str | None = None
    notes: Sequence[str] = ()
    has_tokenizer: bool = True
    endpoint: str = "https://huggingface.co"


def render_card(c: CardInputs) -> str:
    """The README.md of the merged model."""
    from huggingface_hub import ModelCard, ModelCardData

    base_card, adapter_card = dict(c.base_card), dict(c.adapter_card)
    license_name = base_card.get("license")
    metadata: dict[str, Any] = {}
    if license_name == "other":
        metadata.update({k: base_card[k] for k in ("license_name", "license_link") if k in base_card})
    languages = _unique([*_listed(adapter_card.get("language")), *c.language, *_listed(base_card.get("language"))])
    datasets = _listed(adapter_card.get("datasets"))
    base_model = c.base if c.base_is_hub else c.base_repo
    card_data = ModelCardData(
        base_model=base_model,
        license=license_name,
        library_name="transformers",
        pipeline_tag=base_card.get("pipeline_tag") or pipeline_tag(c.config),
        tags=_unique([c.spec.peft_type.lower().replace("_", "-"), "merge", "loraship", *c.tags]),
        language=languages or None,
        datasets=datasets or None,
        base_model_relation="finetune" if base_model else None,
        loraship={
            "version": __version__,
            "base": c.base,
            "base_sha": c.base_sha,
            "adapter": c.adapter,
            "adapter_sha": c.adapter_sha,
            "job_hash": c.job_hash,
        },
        **metadata,
    )
    template = resources.files("loraship").joinpath("templates/model_card.md").read_text()
    card = ModelCard.from_template(
        card_data,
        template_str=template,
        model_name=c.repo_id.rsplit("/", 1)[-1],
        repo_id=c.repo_id,
        base_link=_link(c.base, c.base_is_hub, c.endpoint),
        adapter_link=_link(c.adapter, c.adapter_is_hub, c.endpoint),
        base_sha=c.base_sha,
        adapter_sha=c.adapter_sha,
        method=c.spec.method,
        lora_summary=lora_summary(c.spec),
        modules_summary=modules_summary(c.spec),
        dtype_summary=c.dtype,
        version=__version__,
        job_hash=c.job_hash,
        notes=list(c.notes),
        verified=c.verification is not None,
        verification=c.verification or "Not verified: verification was turned off for this job.\n",
        auto_class=auto_class(c.config),
        has_tokenizer=c.has_tokenizer,
        job_yaml=c.job_yaml,
        extra=(c.extra or "").strip(),
        adapter_text=adapter_description(c.adapter_text),
    )
    return str(card.content).rstrip() + "\n"


def pipeline_tag(config: Mapping[str, Any]) -> str | None:
    """The Hub's pipeline tag for the model's architecture, from transformers' auto-model mappings."""
    task = _task(config)
    return task[1] if task else None


def auto_class(config: Mapping[str, Any]) -> str:
    """The transformers Auto class that loads the architecture (``AutoModel`` when no task lists it)."""
    task = _task(config)
    return task[2] if task else "AutoModel"


def _task(config: Mapping[str, Any]) -> tuple[str, str, str] | None:
    from transformers.models.auto import modeling_auto

    arch = str((config.get("architectures") or [""])[0])
    for task in _TASKS:
        names = getattr(modeling_auto, f"MODEL_FOR_{task[0]}_MAPPING_NAMES", {})
        if any(arch == v or (isinstance(v, tuple) and arch in v) for v in names.values()):
            return task
    return None


def lora_summary(spec: AdapterSpec) -> str:
    """``r = 16, alpha = 32, scale = 2 (rsLoRA)`` — patterns shown as ranges; each method its own settings."""
    return settings_summary(spec)


def modules_summary(spec: AdapterSpec) -> str:
    """``model.layers.*.self_attn.q_proj`` ×22, ... (layer numbers folded)."""
    names = [m.module + ("" if m.param == "weight" else f".{m.param}") for m in spec.lora_modules]
    names += [m.module for m in spec.method_modules]
    names += [f"{r.module}.{r.param}" for r in spec.replacements]
    counts = Counter(re.sub(r"\.\d+\.", ".*.", n) for n in names)
    if not counts:
        return "none"
    return ", ".join(f"`{name}` ×{n}" if n > 1 else f"`{name}`" for name, n in sorted(counts.items()))


def _span(values: Sequence[float]) -> str:
    shown = [f"{v:g}" for v in values]
    return shown[0] if len(shown) == 1 else f"{shown[0]}–{shown[-1]}"


def _link(name: str, is_hub: bool, endpoint: str) -> str:
    return f"[{name}]({endpoint}/{name})" if is_hub else f"`{name}`"  # a local name says "local"


def _listed(value: Any) -> list[str]:
    if value is None:
        return []
    return [str(v) for v in value] if isinstance(value, list) else [str(value)]


def _unique(values: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(values))


def adapter_description(text: str) -> str:
    """What the adapter's card says beyond the unfilled template, without metadata or title, headings demoted.

    PEFT's ``save_pretrained`` writes huggingface_hub's model card template with every field left as
    "[More Information Needed]". Lines of that template, HTML comments and PEFT's "Framework
    versions" stamp are dropped; a heading stays only when something under it is left.
    """
    body = text
    if body.startswith("---"):
        end = body.find("\n---", 3)
        body = body[end + 4 :] if end != -1 else body
    body = re.sub(r"<!--.*?-->", "", body, flags=re.DOTALL)
    lines = body.strip().splitlines()
    if lines and lines[0].startswith("# "):
        lines = lines[1:]
    template = _template_lines()
    sections: list[tuple[int, str, list[str]]] = [(0, "", [])]  # (heading level, heading, kept lines)
    for line in lines:
        if found := re.match(r"(#+)\s", line):
            sections.append((len(found.group(1)), line, []))
        elif line.strip() not in template and not _UNFILLED.search(line):
            sections[-1][2].append(line)
    out: list[str] = []
    for i, (_, title, kept) in enumerate(sections):
        if title and _says_something(kept, *_subsections(sections, i)):
            out += ["", "#" + title, ""]
        out += kept if _says_something(kept) else []
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip()


_UNFILLED = re.compile(r"\[More Information Needed\]|^- PEFT \S+$")


def _says_something(*parts: Sequence[str]) -> bool:
    return any(line.strip() for lines in parts for line in lines)


def _subsections(sections: Sequence[tuple[int, str, list[str]]], i: int) -> Iterator[list[str]]:
    """The kept lines of each section nested under section ``i``."""
    for level, _, kept in sections[i + 1 :]:
        if level <= sections[i][0]:
            return
        yield kept


@functools.cache
def _template_lines() -> frozenset[str]:
    """The lines of huggingface_hub's default model card, unfilled (what PEFT saves with an adapter)."""
    from huggingface_hub import ModelCard, ModelCardData

    text = re.sub(r"<!--.*?-->", "", str(ModelCard.from_template(ModelCardData()).content), flags=re.DOTALL)
    return frozenset(line.strip() for line in text.splitlines() if line.strip())
