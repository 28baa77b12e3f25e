"""Merge benchmark: loraship vs a plain copy of the base files vs the PEFT path.

Generates (once, cached) a random Llama-shaped bf16 model of about 1.1 B parameters (hidden 2048,
22 layers, intermediate 5632, 32 heads / 4 kv heads, vocab 32000) saved with transformers'
``save_pretrained(max_shard_size="500MB")``, and a LoRA adapter r=16, alpha=32 on every linear
layer with non-zero ``lora_B``. Then runs, each as its own process, alternating, ``--runs`` times:

1. a copy of the base's files (``cp -r``): the floor, the merge is I/O-bound;
2. the PEFT path: ``from_pretrained`` -> ``PeftModel.from_pretrained`` -> ``merge_and_unload``
   -> ``save_pretrained`` (CPU, bf16);
3. ``loraship merge``.

Reports medians of wall time and peak RSS (the child's own ``ru_maxrss``, from ``wait4``) and the
ratios loraship/copy and PEFT/loraship, as a table and as JSON. ``--size 2`` runs a model twice
as deep, to show that loraship's memory does not grow with the model.

``--model qwen3-moe``: a Qwen3-MoE-shaped model of about 1 B parameters (hidden 1024, 12 layers,
64 experts of 384, as Qwen3-30B-A3B at a smaller scale), stored per expert as transformers saves it,
with a LoRA r=16 on the fused experts (``target_parameters``) and attention: each expert's slice is
merged on its own. ``--model llama-fp8``: the Llama model above stored as block-scaled FP8
(128×128, as DeepSeek/Qwen FP8 releases), dequantized while streaming (PEFT path: transformers'
``FineGrainedFP8Config(dequantize=True)``).

    python benchmarks/merge_bench.py                 # 1.1 B model, 3 runs each
    python benchmarks/merge_bench.py --size 2        # 44 layers
    python benchmarks/merge_bench.py --skip-peft     # loraship and copy only
    python benchmarks/merge_bench.py --model qwen3-moe
    python benchmarks/merge_bench.py --method loha   # LoHa r=16 on every linear layer (also ia3, oft)

``--method``: the same Llama base with an adapter of another PEFT method on every linear layer: LoHa
(r=16, alpha=32, additive, computed whole per tensor), IA3 (PEFT's Llama default targets, multiplicative)
or OFT (blocks of 32, multiplicative). The default is LoRA.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".bench-cache"
RESULTS = ROOT / "benchmarks" / "results"

LLAMA_1B = {
    "vocab_size": 32000,
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
}

QWEN3_MOE_1B = {
    "vocab_size": 32000,
    "hidden_size": 1024,
    "intermediate_size": 3072,
    "moe_intermediate_size": 384,
    "num_experts": 64,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 12,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "head_dim": 64,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
}
MODELS = ("llama", "qwen3-moe", "llama-fp8")
METHODS = ("lora", "loha", "ia3", "oft")
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

PEFT_PATH = """
import json, sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
from loraship.check.outputs import loader_kwargs
base, adapter, out = sys.argv[1:4]
dequantize = loader_kwargs(json.load(open(base + "/config.json")))
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16, **dequantize)
model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
model.save_pretrained(out)
"""


def _folder(size: int, kind: str) -> Path:
    return CACHE / (f"llama-1b-x{size}" if kind == "llama" else f"{kind}-x{size}")


def cached(size: int, kind: str = "llama", method: str = "lora") -> tuple[Path, Path]:
    """The cached base and adapter folders for this size, generated (in a child process) if missing.

    Generating holds the whole model in memory; it runs in its own process so that the measured
    children, which inherit their parent's peak-RSS mark across exec, start from a small parent.
    """
    folder = _folder(size, kind)
    base, adapter = folder / "base", folder / ("adapter" if method == "lora" else f"adapter-{method}")
    if not (folder / "adapter" / "adapter_model.safetensors").is_file():
        cmd = [sys.executable, __file__, "--generate", "--size", str(size), "--model", kind]
        subprocess.run(cmd, check=True)
    if not (adapter / "adapter_model.safetensors").is_file():
        cmd = [sys.executable, __file__, "--generate-adapter", "--size", str(size), "--model", kind, "--method", method]
        subprocess.run(cmd, check=True)
    return base, adapter


def generate_adapter(size: int, kind: str, method: str) -> None:
    """An adapter of another PEFT method for the cached base, every trained tensor random."""
    from loraship.tiny import build_method_adapter

    settings: dict[str, dict[str, object]] = {
        "loha": {"r": 16, "alpha": 32, "target_modules": LINEAR},
        "ia3": {"target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]},
        "oft": {"oft_block_size": 32, "target_modules": LINEAR},
    }
    folder = _folder(size, kind)
    print(f"Generating the {method} adapter in {folder} (once) ...", flush=True)
    build_method_adapter(folder / "base", folder / f"adapter-{method}", method.upper(), **settings[method])


def generate(size: int, kind: str = "llama") -> None:
    folder = _folder(size, kind)
    base, adapter = folder / "base", folder / "adapter"
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    print(f"Generating the benchmark model ({kind} x{size}) in {folder} (once) ...", flush=True)
    shutil.rmtree(folder, ignore_errors=True)
    shape = QWEN3_MOE_1B if kind == "qwen3-moe" else LLAMA_1B
    depth = {"num_hidden_layers": shape["num_hidden_layers"] * size}
    config = Qwen3MoeConfig(**{**shape, **depth}) if kind == "qwen3-moe" else LlamaConfig(**{**shape, **depth})
    with torch.device("meta"):
        model = Qwen3MoeForCausalLM(config) if kind == "qwen3-moe" else LlamaForCausalLM(config)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).mul_(0.02).to(torch.bfloat16))
    model.save_pretrained(str(base), max_shard_size="500MB")
    if kind == "qwen3-moe":
        lora = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                          target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
                          init_lora_weights=False)  # fmt: skip
    else:
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        lora = LoraConfig(r=16, lora_alpha=32, target_modules=targets, init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(str(adapter))
    if kind == "llama-fp8":
        from loraship.tiny import quantize_fp8

        quantize_fp8(base)


def run_measured(cmd: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    stderr = proc.stderr.read().decode() if proc.stderr else ""
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{stderr}")
    return wall, usage.ru_maxrss * 1024


def bench(size: int, runs: int, skip_peft: bool, kind: str = "llama", method: str = "lora") -> dict[str, object]:
    base, adapter = cached(size, kind, method)
    work = CACHE / "runs"
    loraship = str(Path(sys.executable).with_name("loraship"))
    commands: dict[str, list[str]] = {
        "copy": ["cp", "-r", str(base), str(work / "copy")],
        "loraship": [
            loraship,
            "merge",
            "--base",
            str(base),
            "--adapter",
            str(adapter),
            "--output",
            str(work / "loraship"),
            "--quiet",
        ],
    }
    if not skip_peft:
        commands["peft"] = [sys.executable, "-c", PEFT_PATH, str(base), str(adapter), str(work / "peft")]
    samples: dict[str, list[tuple[float, int]]] = {name: [] for name in commands}
    subprocess.run(["cat", *map(str, base.glob("*.safetensors"))], stdout=subprocess.DEVNULL, check=True)  # warm
    for i in range(runs):
        order = list(commands)[i % len(commands) :] + list(commands)[: i % len(commands)]
        for name in order:
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            os.sync()
            samples[name].append(run_measured(commands[name]))
            print(f"  run {i + 1}/{runs} {name:9s} {samples[name][-1][0]:6.2f} s "
                  f"{samples[name][-1][1] / 1e9:5.2f} GB", flush=True)  # fmt: skip
    shutil.rmtree(work, ignore_errors=True)
    medians = {
        name: {"wall_s": statistics.median(w for w, _ in s), "peak_rss_gb": statistics.median(r for _, r in s) / 1e9}
        for name, s in samples.items()
    }
    base_bytes = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    largest = max(_largest_tensor(p) for p in base.glob("*.safetensors"))
    result: dict[str, object] = {
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_implementation()} "
        f"{platform.python_version()}",
        "model": {
            "llama": f"random Llama bf16, {LLAMA_1B['num_hidden_layers'] * size} layers",
            "llama-fp8": f"random Llama FP8 (128×128 blocks), {LLAMA_1B['num_hidden_layers'] * size} layers",
            "qwen3-moe": f"random Qwen3-MoE bf16, {QWEN3_MOE_1B['num_hidden_layers'] * size} layers × "
            f"{QWEN3_MOE_1B['num_experts']} experts",
        }[kind]
        + f", {base_bytes / 1e9:.2f} GB"
        + ("" if method == "lora" else f"; {method} adapter"),
        "method": method,
        "largest_tensor_gb": largest / 1e9,
        "runs": runs,
        "medians": medians,
        "loraship_over_copy": medians["loraship"]["wall_s"] / medians["copy"]["wall_s"],
    }
    if "peft" in medians:
        result["peft_over_loraship"] = medians["peft"]["wall_s"] / medians["loraship"]["wall_s"]
        result["peft_rss_over_loraship"] = medians["peft"]["peak_rss_gb"] / medians["loraship"]["peak_rss_gb"]
    return result


def _largest_tensor(path: Path) -> int:
    """Read from the safetensors header with plain json: this process must not import torch."""
    with path.open("rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    return max(e["data_offsets"][1] - e["data_offsets"][0] for k, e in header.items() if k != "__metadata__")


def table(result: dict[str, object]) -> str:
    medians = result["medians"]
    assert isinstance(medians, dict)
    copy_wall = medians["copy"]["wall_s"]
    lines = [
        f"{result['model']}; {result['machine']}; {result['date']}; medians of {result['runs']} alternated runs",
        "",
        "| what | wall | × copy | peak RSS |",
        "|---|---|---|---|",
    ]
    labels = {"copy": "copy of the base's files (`cp -r`)", "peft": "PEFT path (load, merge_and_unload, save)",
              "loraship": "`loraship merge`"}  # fmt: skip
    for name in ("copy", "peft", "loraship"):
        if name in medians:
            m = medians[name]
            rss = "–" if name == "copy" else f"{m['peak_rss_gb']:.2f} GB"
            lines.append(f"| {labels[name]} | {m['wall_s']:.2f} s | {m['wall_s'] / copy_wall:.1f}× | {rss} |")
    lines.append("")
    lines.append(f"loraship / copy: {result['loraship_over_copy']:.2f}×")
    if "peft_over_loraship" in result:
        lines.append(
            f"PEFT / loraship: {result['peft_over_loraship']:.1f}× the time, "
            f"{result['peft_rss_over_loraship']:.1f}× the memory"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=1, help="model depth multiplier (1: 22 layers, 2: 44 layers)")
    parser.add_argument("--runs", type=int, default=3, help="runs of each command (default 3)")
    parser.add_argument("--skip-peft", action="store_true", help="do not run the (slow, memory-hungry) PEFT path")
    parser.add_argument("--json", type=Path, help="write the result here (default: benchmarks/results/...)")
    parser.add_argument("--model", choices=MODELS, default="llama", help="what to merge (default: llama)")
    parser.add_argument("--method", choices=METHODS, default="lora", help="the adapter's PEFT method (llama only)")
    parser.add_argument("--generate", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--generate-adapter", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.generate:
        generate(args.size, args.model)
        return 0
    if args.generate_adapter:
        generate_adapter(args.size, args.model, args.method)
        return 0
    if args.method != "lora" and args.model != "llama":
        parser.error("--method runs on the Llama model only")
    result = bench(args.size, args.runs, args.skip_peft, args.model, args.method)
    print()
    print(table(result))
    suffix = ("" if args.model == "llama" else f"_{args.model}") + ("" if args.method == "lora" else f"_{args.method}")
    out = args.json or RESULTS / f"merge_bench{suffix}_x{args.size}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nWrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
