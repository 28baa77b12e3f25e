"""The generated model card: a golden file, and metadata the Hub's own parser reads."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from loraship import __version__
from loraship.engine.adapter import PREFIX, parse_adapter
from loraship.engine.safetensors_io import TensorInfo
from loraship.run.card import (
    CardInputs,
    adapter_description,
    auto_class,
    lora_summary,
    modules_summary,
    pipeline_tag,
    render_card,
)
from loraship.run.job import MergeJob

GOLDEN = Path(__file__).parents[1] / "golden" / "model_card.md"


def _info(name: str, shape: tuple[int, ...]) -> TensorInfo:
    return TensorInfo(name, "F32", shape, Path("/x"), 0, 4 * math.prod(shape))


def card_inputs() -> CardInputs:
    tensors = {}
    for layer in range(2):
        for module, out_f in (("q_proj", 64), ("v_proj", 16)):
            name = f"{PREFIX}model.layers.{layer}.self_attn.{module}"
            tensors[f"{name}.lora_A.weight"] = _info(f"{name}.lora_A.weight", (16, 64))
            tensors[f"{name}.lora_B.weight"] = _info(f"{name}.lora_B.weight", (out_f, 16))
    config = {"peft_type": "LORA", "r": 16, "lora_alpha": 32, "use_rslora": True}
    spec = parse_adapter(config, tensors, folder=Path("/adapter"))
    job = MergeJob(name="chat", adapter="org/chat-lora@v1.2", output="org/chat-model", dtype="bfloat16",
                   card={"tags": ["chat"], "language": "en", "extra": "Use the chat template."})  # fmt: skip
    return CardInputs(
        repo_id="org/chat-model", base="meta/tiny-base", adapter="org/chat-lora", spec=spec,
        config={"architectures": ["LlamaForCausalLM"]}, dtype="bfloat16", job_yaml=job.to_yaml(),
        job_hash=job.job_hash(), base_sha="a" * 40, adapter_sha="b" * 40,
        base_card={"license": "other", "license_name": "tiny", "license_link": "LICENSE"},
        adapter_card={"datasets": ["org/chats"], "language": ["de"]},
        adapter_text="---\nlicense: mit\n---\n# org/chat-lora\n\nA chat adapter.\n\n## Training\n\n3 epochs.\n",
        verification="### loraship verification: passed\n\n| level | check |\n|---|---|\n| weights | all |\n",
        tags=job.card.tags, language=job.card.language, extra=job.card.extra,
        notes=["The adapter resizes the vocabulary from 64 to 70 tokens: config.json follows."],
    )  # fmt: skip


def test_rendered_card_matches_the_golden_file() -> None:
    rendered = render_card(card_inputs())
    expected = GOLDEN.read_text().replace("{version}", __version__)
    assert rendered == expected


def test_card_metadata_reads_back_with_the_hub_parser(tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text(render_card(card_inputs()))
    data = ModelCard.load(tmp_path / "README.md").data.to_dict()
    assert data["base_model"] == "meta/tiny-base"
    assert data["base_model_relation"] == "finetune"
    assert (data["license"], data["license_name"], data["license_link"]) == ("other", "tiny", "LICENSE")
    assert (data["library_name"], data["pipeline_tag"]) == ("transformers", "text-generation")
    assert data["tags"] == ["lora", "merge", "loraship", "chat"]
    assert (data["language"], data["datasets"]) == (["de", "en"], ["org/chats"])
    assert data["loraship"] == {"version": __version__, "base": "meta/tiny-base", "base_sha": "a" * 40,
                                "adapter": "org/chat-lora", "adapter_sha": "b" * 40,
                                "job_hash": card_inputs().job_hash}  # fmt: skip


def test_summaries() -> None:
    spec = card_inputs().spec
    assert lora_summary(spec) == "r = 16, alpha = 32, scale = 8 (rsLoRA)"
    assert modules_summary(spec) == "`model.layers.*.self_attn.q_proj` ×2, `model.layers.*.self_attn.v_proj` ×2"


@pytest.mark.parametrize(
    ("config", "roles", "summary", "tag"),
    [
        ({"peft_type": "LOHA", "r": 4, "alpha": 8, "rank_pattern": {"v_proj": 2}},
         {"hada_w1_a": (64, 4), "hada_w1_b": (4, 64), "hada_w2_a": (64, 4), "hada_w2_b": (4, 64)},
         "r = 2–4, alpha = 8, scale = 2–4", "loha"),
        ({"peft_type": "IA3", "feedforward_modules": ["down_proj"]}, {"ia3_l": (64, 1)},
         "4 module(s) scaled on their outputs, 0 feed-forward on their inputs", "ia3"),
    ],
    ids=["loha", "ia3"],
)  # fmt: skip
def test_card_names_the_method(config: dict, roles: dict, summary: str, tag: str, tmp_path: Path) -> None:
    tensors = {}
    for layer in range(2):
        for module in ("q_proj", "v_proj"):
            name = f"{PREFIX}model.layers.{layer}.self_attn.{module}"
            tensors.update({f"{name}.{role}": _info(f"{name}.{role}", shape) for role, shape in roles.items()})
    spec = parse_adapter(config, tensors, folder=Path("/adapter"))
    assert lora_summary(spec) == summary
    assert modules_summary(spec) == "`model.layers.*.self_attn.q_proj` ×2, `model.layers.*.self_attn.v_proj` ×2"
    card = render_card(replace(card_inputs(), spec=spec))
    assert f"with the {spec.method} adapter [org/chat-lora]" in card
    assert f"| {spec.method} | {summary} |" in card
    (tmp_path / "README.md").write_text(card)
    assert ModelCard.load(tmp_path / "README.md").data.to_dict()["tags"][0] == tag


def test_peft_unfilled_card_is_left_out_and_a_filled_one_keeps_only_what_it_says(tmp_path: Path) -> None:
    from loraship import tiny

    base = tiny.build_model(tmp_path / "base", dict(tiny.TINY_LLAMA))
    peft_card = (tiny.build_adapter(base, tmp_path / "adapter") / "README.md").read_text()
    assert peft_card.count("[More Information Needed]") > 30  # PEFT's save_pretrained wrote the template
    assert adapter_description(peft_card) == ""
    card = render_card(replace(card_inputs(), adapter_text=peft_card))
    assert "About the adapter" not in card and "More Information" not in card
    assert "[org/chat-lora](https://huggingface.co/org/chat-lora)" in card  # linked either way

    filled = peft_card.replace(
        "<!-- Provide a quick summary of what the model is/does. -->", "A German support-chat adapter."
    ).replace("- **Developed by:** [More Information Needed]", "- **Developed by:** Acme")
    assert adapter_description(filled) == (
        "A German support-chat adapter.\n\n### Model Details\n\n#### Model Description\n\n- **Developed by:** Acme"
    )


@pytest.mark.parametrize(
    ("architecture", "tag", "auto"),
    [
        ("LlamaForCausalLM", "text-generation", "AutoModelForCausalLM"),
        ("Qwen3MoeForCausalLM", "text-generation", "AutoModelForCausalLM"),
        ("Qwen2VLForConditionalGeneration", "image-text-to-text", "AutoModelForImageTextToText"),
        ("Gemma3ForConditionalGeneration", "image-text-to-text", "AutoModelForImageTextToText"),
        ("WhisperForConditionalGeneration", "automatic-speech-recognition", "AutoModelForSpeechSeq2Seq"),
        ("T5ForConditionalGeneration", "text2text-generation", "AutoModelForSeq2SeqLM"),
        ("BertForSequenceClassification", "text-classification", "AutoModelForSequenceClassification"),
        ("LlamaModel", None, "AutoModel"),
    ],
)
def test_pipeline_tag_and_auto_class_follow_transformers_auto_mappings(
    architecture: str, tag: str | None, auto: str
) -> None:
    config = {"architectures": [architecture]}
    assert (pipeline_tag(config), auto_class(config)) == (tag, auto)


def test_languages_come_from_the_adapter_the_job_and_the_base(tmp_path: Path) -> None:
    inputs = replace(card_inputs(), base_card={"license": "apache-2.0", "language": ["en", "fr"]})
    (tmp_path / "README.md").write_text(render_card(inputs))
    assert ModelCard.load(tmp_path / "README.md").data.to_dict()["language"] == ["de", "en", "fr"]
