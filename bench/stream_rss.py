"""Streaming check: `posttrain data inspect` over a generated 1 GB JSONL stays under 1 GB peak RSS.

Writes a JSONL of multi-turn conversations (three chained GSM8K problems, about 2 KB a row) under a
temporary directory, runs `python -m posttrain data inspect` on it with SmolLM2's tokenizer as a
child process, samples the child's RSS every second, reports its peak (from the kernel's
accounting), and deletes the file.

    .venv/bin/python bench/stream_rss.py [--gb 1.0]
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def generate(path: Path, gsm8k: Path, size_bytes: int, seed: int = 0) -> int:
    rng = random.Random(seed)
    problems = [json.loads(line) for line in gsm8k.open()]
    rows = written = 0
    with open(path, "w") as f:
        while written < size_bytes:
            messages = []
            for p in rng.sample(problems, 3):
                messages += [{"role": "user", "content": p["question"]},
                             {"role": "assistant", "content": p["answer"]}]
            line = json.dumps({"messages": messages}) + "\n"
            f.write(line)
            written += len(line.encode())
            rows += 1
    return rows


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except FileNotFoundError:
        pass
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=1.0)
    parser.add_argument("--gsm8k", default=str(ROOT.parent / "shared" / "data" / "gsm8k_train.jsonl"))
    args = parser.parse_args()

    from posttrain.models.hub import import_model

    tokenizer_dir = import_model("smollm2-135m-instruct")
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        data = Path(tmp) / "big.jsonl"
        t0 = time.perf_counter()
        rows = generate(data, Path(args.gsm8k), int(args.gb * (1 << 30)))
        size = data.stat().st_size
        print(f"generated {rows} rows, {size / (1 << 30):.2f} GiB in {time.perf_counter() - t0:.0f} s")
        recipe = Path(tmp) / "recipe.yaml"
        recipe.write_text(
            f"model: {{path: {tokenizer_dir}}}\n"
            f"data:\n  max_length: 4096\n  sources:\n    - path: {data}\n"
        )
        command = [sys.executable, "-m", "posttrain", "data", "inspect", str(recipe), "--n", "1"]
        t0 = time.perf_counter()
        child = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True)
        samples = []
        while child.poll() is None:
            samples.append(rss_mb(child.pid))
            time.sleep(1.0)
        out = child.stdout.read()
        seconds = time.perf_counter() - t0
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        if child.returncode != 0:
            raise SystemExit(f"inspect failed with exit code {child.returncode}")
    summary = json.loads(out.strip().splitlines()[-1])
    quarter = [round(samples[int(i * (len(samples) - 1) / 4)]) for i in range(5)] if samples else []
    print(f"command: {' '.join(command[1:])}")
    print(f"inspect streamed {size / (1 << 30):.2f} GiB in {seconds:.0f} s "
          f"({size / seconds / (1 << 20):.1f} MiB/s)")
    print(f"summary: {json.dumps(summary)}")
    print(f"RSS at 0/25/50/75/100% of the run (MiB): {quarter}")
    print(f"peak RSS: {peak_mb:.0f} MiB ({'under' if peak_mb < 1024 else 'OVER'} 1 GiB)")
    print("the file was deleted")


if __name__ == "__main__":
    main()
