"""Run benchmark (not a test): `loraship run` Hub to Hub through the local test Hub, with a bandwidth limit.

The 1.1 B benchmark model of merge_bench.py (``--size 2``: 2.2 B) is seeded on the local Hub of the
tests (tests/hub_server.py, the real huggingface_hub client talks to it), which serves downloads and
takes LFS uploads at ``--bandwidth`` MB/s each way, so the network matters as it does in real life.

Measured, each `loraship run` in its own process with a fresh Hugging Face cache:

- the pure transfers of the same bytes: downloading the base, uploading a model of that size;
- **sequential** (``--no-stream``), first publication: download the whole base, merge, verify,
  then upload and commit;
- **streaming**, first publication (a new output repo) and a release into an existing repo:
  base shards downloaded while the merge runs, each merged shard checked, uploaded and deleted.

For each: wall time, wall ÷ max(download, upload), peak disk used (the blocks allocated under the
cache and the run's folder, sampled every 0.1 s: a streaming run's placeholders are sparse), peak
RSS. Verification checks the weights (``verify.outputs: false``) unless ``--outputs`` (then with
``--max-memory`` and ``--generation-tokens``).

    .venv/bin/python benchmarks/run_bench.py [--size 1] [--bandwidth 200] [--outputs [--max-memory 1GB]]
        [--only sequential|first|release]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from datetime import date
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "benchmarks")]

import merge_bench  # noqa: E402  (benchmarks/, on the path above)

TOKEN = "hf_bench_token_not_a_secret"


class DiskSampler:
    """The largest total size of the files under some folders, sampled in a thread, and what was
    on disk at that moment (files of 1 MB or more: which shards the peak holds)."""

    def __init__(self, *folders: Path) -> None:
        self.folders, self.peak, self._stop = folders, 0, threading.Event()
        self.peak_files: dict[str, int] = {}
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            files = {k: v for f in self.folders for k, v in _sizes(f).items()}
            total = sum(files.values())
            if total > self.peak:
                self.peak = total
                self.peak_files = {k: v for k, v in sorted(files.items()) if v >= 1 << 20}

    def __enter__(self) -> DiskSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _sizes(folder: Path) -> dict[str, int]:
    """Blocks allocated (bytes) per file under ``folder``, by path relative to its parent."""
    sizes: dict[str, int] = {}
    for dirpath, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(dirpath, name)
            with contextlib.suppress(OSError):  # a file deleted while walking
                sizes[os.path.relpath(path, folder.parent)] = os.lstat(path).st_blocks * 512
    return sizes


def measured(cmd: list[str], env: dict[str, str], *folders: Path) -> dict[str, Any]:
    """Wall seconds, peak RSS and peak disk (bytes, and the files at the peak) of one child process."""
    with DiskSampler(*folders) as disk:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        err = proc.stderr.read().decode() if proc.stderr else ""
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    return {"wall_s": wall, "rss_bytes": usage.ru_maxrss * 1024, "disk_bytes": disk.peak, "peak_files": disk.peak_files}


def serve_hub(base: Path, adapter: Path, work: Path, bandwidth_mb: float) -> None:
    """``--serve``: seed the local Hub, print its URL, serve until stdin closes. Its own process: it
    holds every file in memory, and a child inherits its parent's peak-RSS mark across exec."""
    from hub_server import start_hub, stop
    from safetensors.torch import load_file, save_file

    running = start_hub()
    hub = running.hub
    hub.add_user(TOKEN, "bench")
    hub.seed("bench/base", base)
    for name, factor in (("bench/lora", 1.0), ("bench/lora2", 1.01)):  # two adapters: different merged bytes
        folder = work / name.replace("/", "--")
        shutil.copytree(adapter, folder)
        config = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "bench/base"}))
        tensors = load_file(str(folder / "adapter_model.safetensors"))
        save_file({k: v * factor if "lora_B" in k else v for k, v in tensors.items()},
                  str(folder / "adapter_model.safetensors"))  # fmt: skip
        hub.seed(name, folder)
    (work / "readme").mkdir()
    (work / "readme" / "README.md").write_text("An earlier release.\n")
    hub.seed("bench/existing", work / "readme")
    hub.bandwidth = bandwidth_mb * 1e6
    print(hub.url, flush=True)
    sys.stdin.read()
    stop(running.server, running.thread)


def delete_repo(env: dict[str, str], repo_id: str) -> None:
    """Delete a repo of the local Hub (which then drops its blobs): the Hub holds everything in memory."""
    code = f"from huggingface_hub import HfApi; HfApi().delete_repo({repo_id!r})"
    subprocess.run([sys.executable, "-c", code], env=env, check=True)


def bench(
    size: int,
    bandwidth_mb: float,
    outputs: bool,
    max_memory: str | None,
    generation_tokens: int,
    only: Sequence[str] = (),
) -> dict[str, object]:
    base, adapter = merge_bench.cached(size)
    work = Path(tempfile.mkdtemp(prefix="loraship-run-bench-"))
    py = sys.executable
    server = subprocess.Popen([py, __file__, "--serve", str(base), str(adapter), str(work), str(bandwidth_mb)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert server.stdout is not None
        url = server.stdout.readline().strip()
        if not url:
            raise SystemExit("the local Hub did not start")
        weights = sum(p.stat().st_size for p in base.glob("*.safetensors"))

        def env(home: Path) -> dict[str, str]:
            return {**os.environ, "HF_HOME": str(home), "HF_ENDPOINT": url, "HF_TOKEN": TOKEN,
                    "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
                    "HF_HUB_DISABLE_XET": "1"}  # fmt: skip  # the test Hub speaks LFS, not xet

        results: dict[str, dict[str, Any]] = {}
        home = work / "home-download"
        results["download"] = measured(
            [py, "-c", "import sys; from huggingface_hub import snapshot_download; snapshot_download('bench/base')"],
            env(home), home,
        )  # fmt: skip
        shutil.rmtree(home, ignore_errors=True)
        upload = (
            "import sys; from huggingface_hub import HfApi; api = HfApi(); api.create_repo('bench/upload'); "
            "api.upload_folder(repo_id='bench/upload', folder_path=sys.argv[1])"
        )
        probe = work / "upload-probe"  # fresh random bytes: blobs the Hub already holds are not sent again
        probe.mkdir()
        with open(probe / "model.safetensors", "wb") as f:
            for offset in range(0, weights, 64 << 20):
                f.write(os.urandom(min(64 << 20, weights - offset)))
        results["upload"] = measured([py, "-c", upload, str(probe)], env(work / "home-upload"))
        shutil.rmtree(probe)
        delete_repo(env(work / "home-upload"), "bench/upload")
        verify = "verify:\n  outputs: false\n"
        if outputs:
            verify = f"verify:\n  generation_tokens: {generation_tokens}\n"
            verify += f"  max_memory: {max_memory}\n" if max_memory else ""
        runs = (("sequential", "sequential (--no-stream), first publication", "bench/lora", "bench/sequential",
                 ["--no-stream"]),
                ("first", "streaming, first publication", "bench/lora", "bench/first", []),
                ("release", "streaming, release into an existing repo", "bench/lora2", "bench/existing",
                 []))  # fmt: skip
        for key, label, adapter_repo, output, flags in runs:
            if only and key not in only:
                continue
            slug = output.replace("/", "--")
            job = work / f"{slug}.yaml"
            job.write_text(f"adapter: {adapter_repo}\noutput: {output}\n{verify}")
            home, staging = work / f"home-{slug}", work / f"staging-{slug}"
            cmd = [py, "-m", "loraship", "run", "--config", str(job), "--workdir", str(staging), "--quiet", *flags]
            results[label] = measured(cmd, env(home), home, staging)
            shutil.rmtree(home, ignore_errors=True)
            shutil.rmtree(staging, ignore_errors=True)
            if output != "bench/existing":
                delete_repo(env(home), output)
    finally:
        server.communicate(timeout=30)  # closes its stdin: it stops
        shutil.rmtree(work, ignore_errors=True)
    return {
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, CPython {platform.python_version()}",
        "size": size,
        "weights_bytes": weights,
        "bandwidth_mb_s": bandwidth_mb,
        "outputs_checked": outputs,
        "max_memory": max_memory if outputs else None,
        "generation_tokens": generation_tokens if outputs else None,
        "results": results,
    }


def table(result: dict[str, object]) -> str:
    results = result["results"]
    assert isinstance(results, dict)
    transfer = max(results["download"]["wall_s"], results["upload"]["wall_s"])
    rows = ["| what | wall | ÷ max(download, upload) | peak disk | peak RSS |", "|---|---|---|---|---|"]
    for label, r in results.items():
        disk = f"{r['disk_bytes'] / 1e9:.2f} GB" if r["disk_bytes"] else "–"
        rows.append(f"| {label} | {r['wall_s']:.1f} s | {r['wall_s'] / transfer:.2f}× | {disk} | "
                    f"{r['rss_bytes'] / 1e9:.2f} GB |")  # fmt: skip
    weights = result["weights_bytes"]
    assert isinstance(weights, int)
    head = (f"{weights / 1e9:.2f} GB of weights (x{result['size']}), {result['bandwidth_mb_s']:g} MB/s each way, "
            f"outputs checked: {result['outputs_checked']}"
            + (f" (max_memory {result['max_memory']}, {result['generation_tokens']} generated tokens)"
               if result["outputs_checked"] else "")
            + f"; {result['machine']}; {result['date']}")  # fmt: skip
    return head + "\n\n" + "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1, help="model depth multiplier (1: 1.1 B, 2: 2.2 B)")
    parser.add_argument("--bandwidth", type=float, default=200, help="MB/s each way at the local Hub (default 200)")
    parser.add_argument("--outputs", action="store_true", help="run the output-level check too (slow on CPU)")
    parser.add_argument("--max-memory", help="with --outputs: the check's verify.max_memory (e.g. 1GB)")
    parser.add_argument("--generation-tokens", type=int, default=32, help="with --outputs: greedy tokens compared")
    parser.add_argument("--only", action="append", choices=("sequential", "first", "release"),
                        help="run only this (repeatable; default: all three)")  # fmt: skip
    parser.add_argument("--json", type=Path, help="write the result here (default: benchmarks/results/...)")
    parser.add_argument("--serve", nargs=4, help=argparse.SUPPRESS)  # internal: the local Hub's process
    args = parser.parse_args(argv)
    if args.serve:
        base, adapter, work, bandwidth = args.serve
        serve_hub(Path(base), Path(adapter), Path(work), float(bandwidth))
        return 0
    result = bench(args.size, args.bandwidth, args.outputs, args.max_memory, args.generation_tokens, args.only or ())
    print(table(result))
    suffix = "_outputs" if args.outputs else ""
    out = args.json or merge_bench.RESULTS / f"run_bench_x{args.size}{suffix}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nWrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
