"""``loraship demo``: the main job end to end on an embedded, offline default.

Builds a tiny random Llama-style model (with a tokenizer) and a LoRA adapter, merges them with
loraship, merges them again the usual way (PEFT ``merge_and_unload``), and compares the two
tensor by tensor, then checks the merged folder's outputs (plain transformers) against base +
adapter (PEFT, unmerged).
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

from loraship.report import table
from loraship.tiny import TINY_LLAMA, build_adapter, build_model


def run_demo(workdir: Path | None = None) -> int:
    """Run the demo in ``workdir`` (a temporary folder when None); returns the exit code."""
    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="loraship-demo-") as tmp:
            return _run(Path(tmp))
    workdir.mkdir(parents=True, exist_ok=True)
    return _run(workdir)


def _run(work: Path) -> int:
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from loraship.merge import merge

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore")
    base, adapter, merged, reference = work / "base", work / "adapter", work / "merged", work / "peft-merged"
    print(f"Building a tiny random Llama-style model and a LoRA adapter in {work} ...")
    build_model(base, TINY_LLAMA, dtype="bfloat16", tokenizer=True)
    build_adapter(
        base, adapter, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        r=8, lora_alpha=16,
    )  # fmt: skip
    result = merge(base, adapter, merged, overwrite=True, progress=False)
    print(f"loraship merge: {len(result.prepared.plan.changed)} tensors changed, written to {merged}")

    from peft import PeftModel

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.bfloat16)
    PeftModel.from_pretrained(model, str(adapter)).merge_and_unload().save_pretrained(str(reference))
    ours = _tensors(merged / "model.safetensors", safe_open)
    theirs = _tensors(reference / "model.safetensors", safe_open)
    same = [k for k in theirs if k in ours and torch.equal(ours[k].view(torch.int16), theirs[k].view(torch.int16))]

    ids = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29]])
    with torch.no_grad():
        base_model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
        ref_logits = PeftModel.from_pretrained(base_model, str(adapter)).eval()(ids).logits
        del base_model
        out_logits = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32).eval()(ids).logits
    max_diff = (ref_logits - out_logits).abs().max().item()
    top1 = (ref_logits.argmax(-1) == out_logits.argmax(-1)).float().mean().item()
    rows = [
        ("tensors bit-identical to PEFT merge_and_unload", f"{len(same)} / {len(theirs)}",
         "pass" if len(same) == len(theirs) == len(ours) else "FAIL"),
        ("max |logit diff| vs base + adapter (PEFT, unmerged)", f"{max_diff:.2e}",
         "pass" if max_diff < 0.1 else "FAIL"),
        ("top-1 token agreement", f"{top1:.0%}", "pass" if top1 == 1.0 else "FAIL"),
    ]  # fmt: skip
    print()
    print(table(("check", "value", "result"), rows))
    ok = all(r[2] == "pass" for r in rows)
    print("\nThe merged model matches base + adapter." if ok else "\nThe merged model does NOT match.")
    return 0 if ok else 1


def _tensors(path: Path, safe_open):  # type: ignore[no-untyped-def]
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a mapping
