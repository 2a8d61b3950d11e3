"""Rollout engines side by side: the native engine and vLLM on this machine.

    python bench/rollout_engines.py [--prompts 8] [--n 8] [--max-new-tokens 128] [--reps 3]
                                    [--grpo-steps 4] [--engines "native fp32,vllm bf16"] [--vllm-threads N]
                                    [--output-dir DIR]

`--reps 0` skips the generation timing; `--engines` chooses the engines of both parts.

1. Generation: SmolLM2-135M-Instruct, the first `--prompts` GSM8K questions (chat template), `n`
   samples each at temperature 1; generated tokens per second (median of `--reps` after one
   warm-up call) and start-up time, for the native engine (fp32) and vLLM (fp32 and bf16).
2. A GRPO step's time split with each engine (needs `make demo`): the demo's addition config for
   `--grpo-steps` steps from the SFT export, no evaluation; medians over the steps after the
   first of generate / reward / sync / update seconds, rollout tokens/s and the engine/trainer
   log-prob mismatch (fp32 trainer).

Needs `make vllm-env`. Run it alone on the machine: the engines share its cores.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
GSM8K = REPO.parent / "shared" / "data" / "gsm8k_train.jsonl"


def gsm8k_prompts(tokenizer, count: int) -> list[list[int]]:
    rows = [json.loads(line) for line in GSM8K.read_text().splitlines()[:count]]
    return [list(tokenizer.apply_chat_template([{"role": "user", "content": r["question"]}],
                                               add_generation_prompt=True, return_dict=True)["input_ids"])
            for r in rows]


def tree_rss_gib(pid: int) -> float:
    """Resident memory of process `pid` and all its descendants (an engine server and its workers)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        todo.extend(children.get(current, []))
        try:
            status = Path(f"/proc/{current}/status").read_text()
        except OSError:
            continue
        total += next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS")) * 1024
    return total / 2**30


def time_engine(name: str, make, prompts, sampling, n: int, reps: int) -> dict:
    started = time.perf_counter()
    engine = make()
    startup = time.perf_counter() - started
    try:
        engine.generate(prompts, sampling, n=n, seed=0)  # warm-up
        rates, lengths = [], []
        for rep in range(reps):
            t0 = time.perf_counter()
            batch = engine.generate(prompts, sampling, n=n, seed=rep + 1)
            elapsed = time.perf_counter() - t0
            rates.append(batch.lengths.sum().item() / elapsed)
            lengths.append(batch.lengths.float().mean().item())
        pid = getattr(engine, "pid", None)  # a server process: what it keeps while the trainer runs
        rss = tree_rss_gib(pid) if pid is not None else None
    finally:
        close = getattr(engine, "close", None)
        if close is not None:
            close()
    row = {"engine": name, "startup_s": startup, "tokens_per_s": statistics.median(rates),
           "mean_length": statistics.mean(lengths), "server_rss_gib": rss}
    print(f"{name:>14}: start {startup:6.1f} s, {row['tokens_per_s']:7.1f} generated tokens/s "
          f"(reps {', '.join(f'{r:.1f}' for r in rates)}), mean length {row['mean_length']:.1f}"
          + (f", server process tree RSS {rss:.2f} GiB" if rss is not None else ""), flush=True)
    return row


def generation(args) -> list[dict]:
    from transformers import AutoTokenizer

    from posttrain.models.hf import load_hf
    from posttrain.models.hub import import_model
    from posttrain.models.sampling import SamplingParams
    from posttrain.rollout.native import NativeEngine
    from posttrain.rollout.vllm_engine import VLLMEngine

    model_dir = import_model("smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = gsm8k_prompts(tokenizer, args.prompts)
    sampling = SamplingParams(temperature=1.0, max_new_tokens=args.max_new_tokens)
    log = Path(args.output_dir) / "vllm.log"
    makers = {
        "native fp32": lambda: NativeEngine(load_hf(model_dir, dtype=torch.float32), tokenizer),
        "vllm fp32": lambda: VLLMEngine(model_dir, tokenizer, dtype="float32", max_model_len=1024, log_path=log,
                                        threads=args.vllm_threads),
        "vllm bf16": lambda: VLLMEngine(model_dir, tokenizer, dtype="bfloat16", max_model_len=1024, log_path=log,
                                        threads=args.vllm_threads),
    }
    print(f"generation: {len(prompts)} GSM8K prompts x n={args.n}, up to {args.max_new_tokens} new tokens, "
          f"temperature 1, {torch.get_num_threads()} threads", flush=True)
    return [time_engine(name, makers[name], prompts, sampling, args.n, args.reps) for name in args.engines]


def grpo_split(args, engine: str, dtype: str) -> dict:
    from demo_runs import EXPORT, TASK

    from posttrain.config import load_config
    from posttrain.config.grpo import GRPOConfig
    from posttrain.recipes.grpo import run_grpo

    out = Path(args.output_dir) / f"grpo-{engine}-{dtype}"
    no_eval = ["eval.sources=[]", "eval.at_start=false", "eval.every_steps=null", "eval.scorer=null"]
    threads = [f"rollout.vllm.threads={args.vllm_threads}"] if args.vllm_threads else []
    overrides = [f"output_dir={out}", f"model.path={EXPORT}", f"data.sources.0.path={TASK / 'train.jsonl'}",
                 f"train.steps={args.grpo_steps}", "tracking.console=false", *no_eval, *threads,
                 "checkpoint.save_at_end=false", f"rollout.engine={engine}", f"rollout.dtype={dtype}"]
    cfg = load_config(REPO / "configs" / "grpo_demo_addition.yaml", overrides, GRPOConfig)
    result = run_grpo(cfg)
    rows = [json.loads(line) for line in (Path(result.run_dir) / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r][1:]
    keys = {"generate_s": "time/generate_s", "reward_s": "time/reward_s", "sync_s": "time/sync_s",
            "update_s": "step_time_s", "rollout_tokens_per_s": "rollout/tokens_per_s",
            "mismatch_abs": "mismatch/abs_logprob_diff", "mismatch_max": "mismatch/max_abs_logprob_diff",
            "mismatch_kl_k3": "mismatch/kl_k3"}
    row = {"engine": f"{engine} {dtype}", **{k: statistics.median(r[v] for r in rows) for k, v in keys.items()}}
    print(f"{row['engine']:>17}: generate {row['generate_s']:5.1f} s ({row['rollout_tokens_per_s']:.0f} tok/s), "
          f"reward {row['reward_s']:.3f} s, sync {row['sync_s']:.2f} s, update {row['update_s']:5.1f} s; mismatch "
          f"mean {row['mismatch_abs']:.2e} max {row['mismatch_max']:.2e} k3 {row['mismatch_kl_k3']:.2e}", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=3, help="0 skips the generation timing")
    parser.add_argument("--grpo-steps", type=int, default=4, help="0 skips the GRPO split")
    parser.add_argument("--engines", help="comma-separated subset of: native fp32,vllm fp32,vllm bf16")
    parser.add_argument("--vllm-threads", type=int, help="rollout.vllm.threads (default: vLLM's own binding, "
                        "which reserves one core for its front end)")
    parser.add_argument("--output-dir")
    args = parser.parse_args()
    args.engines = args.engines.split(",") if args.engines else ["native fp32", "vllm fp32", "vllm bf16"]
    args.output_dir = args.output_dir or tempfile.mkdtemp(prefix="rollout-engines-")
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    rows = generation(args) if args.reps else []
    for row in rows[1:]:
        print(f"{row['engine']} / {rows[0]['engine']}: {row['tokens_per_s'] / rows[0]['tokens_per_s']:.2f}x "
              "generated tokens/s")
    if args.grpo_steps:
        print(f"GRPO step split (demo addition config, {args.grpo_steps} steps, medians after the first):")
        for name in args.engines:
            engine, dtype = name.split()
            grpo_split(args, engine, {"fp32": "float32", "bf16": "bfloat16"}[dtype])


if __name__ == "__main__":
    main()
