"""Chunked linear cross-entropy vs the naive full-logits path (and TRL's chunked log-prob kernel).

All variants get the same bf16 inputs (one seed): hidden [4, L, d], head [V, d], labels with a
fraction set to -100 at random positions. Two measurements per shape:

* memory: each variant in a fresh subprocess; reset the peak-RSS mark (/proc/self/clear_refs),
  run forward+backward once, report VmHWM minus the RSS before (includes the gradients);
* time: one subprocess runs a warm-up round and then `--reps` rounds, each round timing one
  forward+backward of every variant (order rotated per round), and reports the median per
  variant. Interleaving keeps the ratios fair when other jobs load the machine unevenly.

Variants:
  naive         F.cross_entropy(hidden @ W.T, labels, ignore_index=-100) on all tokens
  naive-sel     the same on the labelled tokens only (separates selection from chunking)
  ours          posttrain.ops.linear_cross_entropy (logits recomputed in backward)
  ours-gif      the same with grads_in_forward=True: gradients computed in the forward, 3 GEMMs per tile
  ours-fp32mm   the same as ours with matmul_dtype=torch.float32 (bf16 inputs, fp32 tile GEMMs)
  trl           trl.kernels.ChunkedLogProbFunction on the labelled tokens, loss = -mean(logprobs)

    python bench/linear_ce.py                                  # both shapes, all variants
    python bench/linear_ce.py --shapes 49152x576 --variants naive,ours
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from posttrain.ops import linear_cross_entropy  # noqa: E402
from posttrain.ops.inputs import DEFAULT_CHUNK_SIZE, DEFAULT_VOCAB_CHUNK_SIZE  # noqa: E402

VARIANTS = ("naive", "naive-sel", "ours", "ours-gif", "ours-fp32mm", "trl")
IGNORE = -100


# ----------------------------------------------------------------------------- variants


def naive(hidden, weight, labels, args):
    logits = hidden.reshape(-1, hidden.shape[-1]) @ weight.t()
    return F.cross_entropy(logits, labels.reshape(-1), ignore_index=IGNORE)


def naive_selected(hidden, weight, labels, args):
    mask = labels.reshape(-1) != IGNORE
    h = hidden.reshape(-1, hidden.shape[-1])[mask]
    return F.cross_entropy(h @ weight.t(), labels.reshape(-1)[mask])


def ours(hidden, weight, labels, args):
    return linear_cross_entropy(
        hidden, weight, labels, chunk_size=args.chunk_size, vocab_chunk_size=args.vocab_chunk_size
    )


def ours_grads_in_forward(hidden, weight, labels, args):
    return linear_cross_entropy(
        hidden, weight, labels, chunk_size=args.chunk_size, vocab_chunk_size=args.vocab_chunk_size,
        grads_in_forward=True,
    )  # fmt: skip


def ours_fp32_matmul(hidden, weight, labels, args):
    return linear_cross_entropy(
        hidden, weight, labels, chunk_size=args.chunk_size, vocab_chunk_size=args.vocab_chunk_size,
        matmul_dtype=torch.float32,
    )  # fmt: skip


def trl(hidden, weight, labels, args):
    from trl.kernels import ChunkedLogProbFunction
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

    mask = labels.reshape(-1) != IGNORE
    h = hidden.reshape(-1, hidden.shape[-1])[mask]
    logprobs = ChunkedLogProbFunction.apply(
        h, weight, None, labels.reshape(-1)[mask], 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, ()
    )[0]
    return -logprobs.sum() / max(int(mask.sum()), 1)


RUNNERS = {"naive": naive, "naive-sel": naive_selected, "ours": ours, "ours-gif": ours_grads_in_forward,
           "ours-fp32mm": ours_fp32_matmul, "trl": trl}  # fmt: skip


# ----------------------------------------------------------------------------- worker


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def _inputs(args) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    vocab, dim = args.shape
    torch.manual_seed(0)
    n = args.tokens
    batch = 4 if n % 4 == 0 else 1
    hidden = torch.randn(batch, n // batch, dim, dtype=torch.bfloat16).requires_grad_()
    weight = (torch.randn(vocab, dim, dtype=torch.bfloat16) * dim**-0.5).requires_grad_()
    labels = torch.randint(0, vocab, (batch, n // batch))
    labels.view(-1)[torch.randperm(n)[: round(args.ignore * n)]] = IGNORE
    return hidden, weight, labels


def _step(variant: str, hidden, weight, labels, args) -> float:
    hidden.grad = weight.grad = None
    loss = RUNNERS[variant](hidden, weight, labels, args)
    loss.backward()
    return float(loss)


def memory_worker(args) -> None:
    hidden, weight, labels = _inputs(args)
    _reset_peak_rss()
    base = _status_kib("VmRSS")
    loss = _step(args.variant, hidden, weight, labels, args)
    peak_mib = (_status_kib("VmHWM") - base) / 1024
    norms = [float(hidden.grad.float().norm()), float(weight.grad.float().norm())]
    print(json.dumps(dict(peak_mib=peak_mib, loss=loss, grad_norms=norms)))


def time_worker(args) -> None:
    hidden, weight, labels = _inputs(args)
    variants = args.variants.split(",")
    times: dict[str, list[float]] = {v: [] for v in variants}
    for rnd in range(args.reps + 1):  # round 0 is the warm-up
        order = variants[rnd % len(variants) :] + variants[: rnd % len(variants)]
        for variant in order:
            t0 = time.perf_counter()
            _step(variant, hidden, weight, labels, args)
            if rnd:
                times[variant].append(time.perf_counter() - t0)
        print(f"round {rnd} done, load {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
    print(json.dumps({v: dict(times=t, median_s=statistics.median(t)) for v, t in times.items()}))


# ----------------------------------------------------------------------------- driver


def _shape(text: str) -> tuple[int, int]:
    vocab, dim = text.lower().split("x")
    return int(vocab), int(dim)


def _run_worker(worker_args: list[str], what: str) -> dict | None:
    cmd = [sys.executable, __file__, *worker_args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if proc.returncode != 0:
        print(f"{what}: failed (exit {proc.returncode})\n{proc.stderr[-2000:]}", flush=True)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="49152x576,262144x640", help="comma-separated VOCABxHIDDEN")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--ignore", type=float, default=0.4, help="fraction of labels set to -100")
    p.add_argument("--reps", type=int, default=3, help="timed rounds after the warm-up round")
    p.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE)
    p.add_argument("--vocab-chunk-size", type=int, default=DEFAULT_VOCAB_CHUNK_SIZE)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument("--worker", choices=("memory", "time"), help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--shape", type=_shape, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        (memory_worker if args.worker == "memory" else time_worker)(args)
        return

    variants = args.variants.split(",")
    unknown = set(variants) - set(RUNNERS)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}; choose from {list(RUNNERS)}")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    print(f"{time.strftime('%Y-%m-%d %H:%M')}, commit {commit.stdout.strip() or '?'}, {os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.1f}", flush=True)  # fmt: skip
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, bf16 inputs, {args.tokens} tokens, "
          f"{args.ignore:.0%} ignored, reps={args.reps}, chunk={args.chunk_size}x{args.vocab_chunk_size}", flush=True)
    rows = []
    for shape in args.shapes.split(","):
        vocab, dim = _shape(shape)
        common = ["--shape", shape, "--variants", ",".join(variants)]
        for flag in ("tokens", "ignore", "reps", "chunk_size", "vocab_chunk_size", "threads"):
            common += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
        memory = {}
        for variant in variants:
            out = _run_worker(["--worker", "memory", "--variant", variant, *common], f"{variant} {shape} memory")
            if out is not None:
                memory[variant] = out
                print(f"  {variant:12s} {shape:>11s}  peak {out['peak_mib']:9.1f} MiB  loss {out['loss']:.5f}  "
                      f"|grad h| {out['grad_norms'][0]:.4f}  |grad W| {out['grad_norms'][1]:.4f}", flush=True)
        timing = _run_worker(["--worker", "time", *common], f"{shape} timing") or {}
        for variant, t in timing.items():
            print(f"  {variant:12s} {shape:>11s}  times {' '.join(f'{x:.2f}' for x in t['times'])} s", flush=True)
        base_mem, base_time = memory.get("naive"), timing.get("naive")
        for variant in variants:
            if variant not in memory or variant not in timing:
                continue
            peak, med = memory[variant]["peak_mib"], timing[variant]["median_s"]
            mem_ratio = base_mem["peak_mib"] / peak if base_mem else float("nan")
            time_ratio = med / base_time["median_s"] if base_time else float("nan")
            rows.append((variant, vocab, dim, peak, mem_ratio, med, time_ratio, memory[variant]["loss"]))

    print()
    print("| variant | vocab | hidden | peak RSS growth (MiB) | naive / variant memory "
          "| median fwd+bwd (s) | time vs naive | loss |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for variant, vocab, dim, peak, mem_ratio, med, time_ratio, loss in rows:
        print(f"| {variant} | {vocab:,} | {dim} | {peak:,.0f} | {mem_ratio:.1f}x | {med:.2f} | {time_ratio:.2f}x "
              f"| {loss:.4f} |")  # fmt: skip


if __name__ == "__main__":
    main()
