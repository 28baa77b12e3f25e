"""One architecture through loraship as a new user would run it, judged against PEFT.

For a model type and a task (causal LM, image-text-to-text, seq2seq LM, sequence classification): a tiny random
model from transformers' own config class (:mod:`shrink`), a LoRA with PEFT's default ``target_modules="all-linear"``
and non-zero weights, loraship's merge, then:

- PEFT's own ``merge_and_unload()`` + ``save_pretrained()`` as the reference for the bits;
- base + adapter through PEFT, unmerged, as the reference for the outputs.

Outcomes: ``exact`` (bit-identical to PEFT's merge, outputs as base + adapter), ``correct`` (outputs as base +
adapter, bits differ from PEFT's merge, which is then wrong: its outputs differ), ``refused`` (a loraship error that
says why), ``wrong`` (loraship exits 0 with a model that does not behave as base + adapter), ``crash`` (anything else
raised by loraship), and two that say nothing of loraship: ``no-model`` (the tiny config or model could not be built)
and ``no-peft`` (PEFT cannot build or merge such an adapter).
"""

from __future__ import annotations

import shutil
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

TASKS = {  # task -> (transformers' auto mapping, the Auto class, PEFT task type)
    "causal-lm": ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "AutoModelForCausalLM", "CAUSAL_LM"),
    "image-text-to-text": ("MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES", "AutoModelForImageTextToText", None),
    "seq2seq-lm": ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "AutoModelForSeq2SeqLM", "SEQ_2_SEQ_LM"),
    "seq-cls": ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "AutoModelForSequenceClassification", "SEQ_CLS"),
}
#: Bounds for "behaves as base + adapter": the merged model's largest logit difference from PEFT's unmerged model,
#: relative to the adapter's effect; an fp32 merge is off by rounding only (about 1e-6 of the effect).
TOLERANCE = 1e-3


@dataclass(frozen=True)
class Outcome:
    model_type: str
    task: str
    kind: str
    detail: str = ""

    @property
    def id(self) -> str:
        return f"{self.task}:{self.model_type}"


def model_types(task: str) -> list[str]:
    """The model types of the installed transformers' auto mapping for ``task``."""
    from transformers.models.auto import modeling_auto

    return sorted(getattr(modeling_auto, TASKS[task][0]))


def run(model_type: str, task: str, tmp: Path, *, dtype: str = "float32") -> Outcome:
    """One case, classified (never raises, except on a bug of this harness).

    ``dtype``: the base's; in half precision the outputs are not compared (rounding), only the bits with PEFT's
    merge: ``exact``, or ``wrong`` where they differ.
    """
    try:
        return _run(model_type, task, tmp, dtype)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _run(model_type: str, task: str, tmp: Path, dtype: str) -> Outcome:
    import transformers
    from peft import LoraConfig, PeftModel, get_peft_model
    from shrink import tiny_config

    from loraship.check.verify import verify
    from loraship.engine.merge import merge
    from loraship.errors import LorashipError

    def outcome(kind: str, detail: str = "") -> Outcome:
        return Outcome(model_type, task, kind, " ".join(detail.split())[:300])

    cls = getattr(transformers, TASKS[task][1])
    try:
        config = tiny_config(model_type)
        if task == "seq-cls":
            config.num_labels = 3
            config.pad_token_id = getattr(config, "pad_token_id", None) or 0
        torch.manual_seed(0)
        model = cls.from_config(config)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.2) if p.dim() > 1 else p.uniform_(0.5, 1.5)
        model.to(getattr(torch, dtype)).save_pretrained(str(tmp / "base"))
        model.float()
        inputs = _inputs(model, config, task)
        with torch.no_grad():
            untouched = _logits(model.eval()(**inputs))
    except Exception as e:  # a config transformers cannot build says nothing of loraship
        return outcome("no-model", f"{type(e).__name__}: {e}")
    del model

    try:
        torch.manual_seed(1)
        model = cls.from_pretrained(str(tmp / "base"), dtype=torch.float32)
        lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type=TASKS[task][2])
        peft_model = get_peft_model(model, lora)
        # As training would leave it: every trainable tensor that gets a gradient moves (lora_B off zero), one
        # the forward never reaches keeps PEFT's initial value (a layer the model bypasses, reading its weight
        # directly, as LongCat-Flash's router does: its LoRA has no effect unmerged, so it must have none merged)
        _logits(peft_model.train()(**inputs)).square().mean().backward()
        with torch.no_grad():
            for p in peft_model.parameters():
                if p.requires_grad and p.grad is not None and bool(p.grad.any()):
                    p.add_(torch.randn_like(p) * 0.1)
                p.grad = None
        peft_model.save_pretrained(str(tmp / "adapter"))
        with torch.no_grad():  # base + adapter as trained (PEFT's reload of the file may differ: the outcome says)
            reference = _logits(peft_model.eval()(**inputs))
        del model, peft_model
        model = cls.from_pretrained(str(tmp / "base"), dtype=torch.float32)
        if dtype != "float32":  # PEFT's merge on the base as stored
            model = cls.from_pretrained(str(tmp / "base"), dtype=getattr(torch, dtype))
        unmerged = PeftModel.from_pretrained(model, str(tmp / "adapter")).eval()
        unmerged.merge_and_unload().save_pretrained(str(tmp / "peft"))
        del model, unmerged
    except Exception as e:  # PEFT's own failure says nothing of loraship
        return outcome("no-peft", f"{type(e).__name__}: {e}")

    try:
        merge(tmp / "base", tmp / "adapter", tmp / "merged", progress=False)
        report = verify(tmp / "base", tmp / "adapter", tmp / "merged", outputs=False)
    except LorashipError as e:
        return outcome("refused", f"{type(e).__name__}: {e.message}")
    except Exception as e:  # the harness classifies it
        return outcome("crash", "".join(traceback.format_exception_only(e)).strip())
    if not report.passed:  # loraship's own check of the folder it wrote
        return outcome("wrong", "`loraship verify --weights-only` fails: " + "; ".join(report.failed_checks))

    if dtype != "float32":
        same = _same_bits(tmp / "merged", tmp / "peft")
        return outcome("exact" if same else "wrong", "" if same else f"not bit-identical to PEFT's merge in {dtype}")
    effect = (reference - untouched).abs().max().item()
    try:
        merged = _logits(cls.from_pretrained(str(tmp / "merged"), dtype=torch.float32).eval()(**inputs))
    except Exception as e:  # a merged folder transformers cannot load is a wrong model
        return outcome("wrong", f"the merged folder does not load: {type(e).__name__}: {e}")
    error = (merged - reference).abs().max().item()
    if not error <= TOLERANCE * max(effect, 1e-3):
        return outcome("wrong", f"merged differs from base + adapter by {error:.3g} (adapter effect {effect:.3g})")
    if _same_bits(tmp / "merged", tmp / "peft"):
        return outcome("exact", f"effect {effect:.3g}")
    peft_error = _logits(cls.from_pretrained(str(tmp / "peft"), dtype=torch.float32).eval()(**inputs)) - reference
    return outcome("correct", f"PEFT's merge is off by {peft_error.abs().max().item():.3g} (effect {effect:.3g})")


def _same_bits(ours: Path, peft: Path) -> bool:
    from conftest import bits, load_tensors

    a, b = load_tensors(ours), load_tensors(peft)
    for name in set(a) & set(b):
        x, y = a[name], b[name]
        if x.dtype != y.dtype and torch.equal(x.to(y.dtype), y):
            continue
        if x.shape != y.shape or x.dtype != y.dtype or not torch.equal(bits(x), bits(y)):
            return False
    return set(a) == set(b)


def _inputs(model: Any, config: Any, task: str) -> dict[str, torch.Tensor]:
    """Token ids (and what the architecture needs beside them) that the model accepts."""
    g = torch.Generator().manual_seed(0)
    text = getattr(config, "text_config", None) or config
    vocab = int(getattr(text, "vocab_size", None) or getattr(config, "vocab_size", 64))
    ids = torch.randint(4, max(vocab - 8, 5), (1, 7), generator=g)
    inputs: dict[str, torch.Tensor] = {"input_ids": ids}
    if task == "seq2seq-lm":
        inputs["decoder_input_ids"] = ids[:, :4]
    return inputs


def _logits(out: Any) -> torch.Tensor:
    for name in ("logits", "last_hidden_state"):
        value = getattr(out, name, None)
        if value is not None:
            return value.float()
    raise TypeError(f"no logits in {type(out).__name__}")
