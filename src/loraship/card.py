"""The merged model's card (README.md). Pure: values in, the card's text out.

Metadata: ``base_model`` with ``base_model_relation: finetune`` (the merged model sits under its
base in the Hub's model tree), the base's license (with ``license_name`` / ``license_link`` when it
is ``other``), ``library_name: transformers``, ``pipeline_tag``, tags, the adapter card's datasets
and languages, and loraship's provenance (base and adapter SHAs, job hash), which reruns use to
recognise what is already published. Body: what the model is, a provenance table, the
verification report, a usage snippet, how to reproduce it, and the adapter card's description.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from loraship import __version__
from loraship.adapter import AdapterSpec

_PIPELINES = {
    "ForCausalLM": "text-generation",
    "LMHeadModel": "text-generation",
    "ForSequenceClassification": "text-classification",
    "ForTokenClassification": "token-classification",
    "ForQuestionAnswering": "question-answering",
    "ForMaskedLM": "fill-mask",
    "ForImageClassification": "image-classification",
    "ForConditionalGeneration": "text2text-generation",
}
_AUTO_CLASSES = {
    "ForCausalLM": "AutoModelForCausalLM",
    "LMHeadModel": "AutoModelForCausalLM",
    "ForSequenceClassification": "AutoModelForSequenceClassification",
    "ForTokenClassification": "AutoModelForTokenClassification",
    "ForQuestionAnswering": "AutoModelForQuestionAnswering",
    "ForMaskedLM": "AutoModelForMaskedLM",
    "ForImageClassification": "AutoModelForImageClassification",
}


@dataclass(frozen=True)
class CardInputs:
    """Everything the card says, gathered by the pipeline.

    Attributes:
        repo_id: Where the merged model lives (a Hub repo id, or a folder name for ``dir:`` outputs).
        base: The base's repo id (or local path); ``base_sha`` its commit when from the Hub.
        adapter: The adapter's repo id (or local path); ``adapter_sha`` likewise.
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
    languages = _unique([*_listed(adapter_card.get("language")), *c.language])
    datasets = _listed(adapter_card.get("datasets"))
    card_data = ModelCardData(
        base_model=c.base if c.base_is_hub else None,
        license=license_name,
        library_name="transformers",
        pipeline_tag=base_card.get("pipeline_tag") or pipeline_tag(c.config),
        tags=_unique(["lora", "merge", "loraship", *c.tags]),
        language=languages or None,
        datasets=datasets or None,
        base_model_relation="finetune" if c.base_is_hub else None,
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
        adapter_text=_strip_title(c.adapter_text),
    )
    return str(card.content).rstrip() + "\n"


def pipeline_tag(config: Mapping[str, Any]) -> str | None:
    arch = str((config.get("architectures") or [""])[0])
    return next((tag for suffix, tag in _PIPELINES.items() if arch.endswith(suffix)), None)


def auto_class(config: Mapping[str, Any]) -> str:
    arch = str((config.get("architectures") or [""])[0])
    return next((cls for suffix, cls in _AUTO_CLASSES.items() if arch.endswith(suffix)), "AutoModel")


def lora_summary(spec: AdapterSpec) -> str:
    """``r = 16, alpha = 32, scale = 2 (rsLoRA)`` — patterns shown as ranges."""
    modules = spec.lora_modules
    ranks = sorted({m.rank for m in modules})
    alphas = sorted({m.alpha for m in modules})
    scales = sorted({m.scale for m in modules})
    parts = [f"r = {_span(ranks)}", f"alpha = {_span(alphas)}", f"scale = {_span(scales)}"]
    kinds = [k for k, on in (("rsLoRA", spec.use_rslora), ("DoRA", spec.use_dora)) if on]
    extras = []
    if spec.replacements:
        extras.append(f"{len(spec.replacements)} trained full tensors (modules_to_save / saved layers)")
    if spec.token_updates:
        extras.append(f"{sum(len(u.indices) for u in spec.token_updates)} trainable token rows")
    text = ", ".join(parts) + (f" ({', '.join(kinds)})" if kinds else "")
    return text + ("; plus " + ", ".join(extras) if extras else "")


def modules_summary(spec: AdapterSpec) -> str:
    """``model.layers.*.self_attn.q_proj`` ×22, ... (layer numbers folded)."""
    names = [m.module + ("" if m.param == "weight" else f".{m.param}") for m in spec.lora_modules]
    names += [f"{r.module}.{r.param}" for r in spec.replacements]
    counts = Counter(re.sub(r"\.\d+\.", ".*.", n) for n in names)
    if not counts:
        return "none"
    return ", ".join(f"`{name}` ×{n}" if n > 1 else f"`{name}`" for name, n in sorted(counts.items()))


def _span(values: Sequence[float]) -> str:
    shown = [f"{v:g}" for v in values]
    return shown[0] if len(shown) == 1 else f"{shown[0]}–{shown[-1]}"


def _link(name: str, is_hub: bool, endpoint: str) -> str:
    return f"[{name}]({endpoint}/{name})" if is_hub else f"`{name}` (a local folder)"


def _listed(value: Any) -> list[str]:
    if value is None:
        return []
    return [str(v) for v in value] if isinstance(value, list) else [str(value)]


def _unique(values: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(values))


def _strip_title(text: str) -> str:
    """The adapter card's body, without its metadata block and first heading, headings demoted."""
    body = text
    if body.startswith("---"):
        end = body.find("\n---", 3)
        body = body[end + 4 :] if end != -1 else body
    lines = body.strip().splitlines()
    if lines and lines[0].startswith("# "):
        lines = lines[1:]
    return "\n".join(("#" + line) if line.startswith("#") else line for line in lines).strip()
