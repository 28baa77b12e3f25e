"""``loraship demo``: the main job end to end on an embedded, offline default.

Builds a tiny random Llama-style model (with a tokenizer and chat template) and a LoRA adapter,
merges them with loraship, verifies the merged folder against base + adapter (``loraship
verify``: weights, then outputs through PEFT unmerged), and compares every tensor with the usual
way of merging (PEFT ``merge_and_unload``).
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

from loraship.tiny import TINY_LLAMA, build_adapter, build_model


def run_demo(workdir: Path | None = None) -> int:
    """Run the demo in ``workdir`` (a temporary folder when None); returns the exit code."""
    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="loraship-demo-") as tmp:
            code = _run(Path(tmp))
        print(f"\nThe files were in a temporary folder ({tmp}), now deleted: pass --workdir DIR to keep them.")
        return code
    workdir.mkdir(parents=True, exist_ok=True)
    code = _run(workdir)
    print(
        f"\nKept in {workdir}: base/, adapter/ and merged/ (try `loraship plan --base {workdir / 'base'} "
        f"--adapter {workdir / 'adapter'}`)."
    )
    return code


def _run(work: Path) -> int:
    from transformers.utils import logging as hf_logging

    from loraship.check.verify import render_text, verify
    from loraship.console import format_merge_result
    from loraship.engine.merge import merge

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore")
    base, adapter, merged = work / "base", work / "adapter", work / "merged"
    print(f"1. Building a tiny random Llama-style model (bf16, with a tokenizer) and a LoRA adapter in {work}")
    build_model(base, TINY_LLAMA, dtype="bfloat16", tokenizer=True)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    build_adapter(base, adapter, target_modules=targets, r=8, lora_alpha=16)
    print("\n2. loraship merge")
    print(format_merge_result(merge(base, adapter, merged, overwrite=True, progress=False)))
    print("\n3. loraship verify (weights, then outputs: base + adapter through PEFT vs the merged folder)")
    report = verify(base, adapter, merged)
    print(render_text(report))
    same, total = _compare_with_peft(base, adapter, merged, work / "peft-merged")
    print(f"\n4. The usual way (PEFT merge_and_unload + save_pretrained): {same} of {total} tensors bit-identical.")
    ok = report.passed and same == total
    print("\nDemo passed: the merged model is PEFT's merge, verified." if ok else "\nDemo FAILED.")
    return 0 if ok else 1


def _compare_with_peft(base: Path, adapter: Path, merged: Path, reference: Path) -> tuple[int, int]:
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.bfloat16)
    PeftModel.from_pretrained(model, str(adapter)).merge_and_unload().save_pretrained(str(reference))
    ours = load_file(str(merged / "model.safetensors"))
    theirs = load_file(str(reference / "model.safetensors"))
    same = sum(
        1 for k, v in theirs.items() if k in ours and torch.equal(ours[k].view(torch.int16), v.view(torch.int16))
    )
    return same, max(len(theirs), len(ours))
