"""DPO throughput and memory: posttrain vs TRL `DPOTrainer`, same model, pairs and settings.

    python bench/dpo_vs_trl.py [--steps 6] [--warmup 2] [--pairs 80] [--sides ours-precompute,...]

SmolLM2-135M-Instruct, full fine-tuning, fp32, activation checkpointing on for both sides, sigmoid
DPO with beta 0.1, AdamW at a constant lr, on this machine's CPU. The pairs: the first `--pairs`
HH harmless pairs (the shared sample) whose chosen + rejected fit in one row of 1,024 tokens,
written in the conversational preference form `{"prompt": [...], "chosen": [...], "rejected":
[...]}` that both sides read. Effective batch ~8 pairs per optimiser step on both: ours packs
pairs into 1 row of 1,024 tokens x 3 micro-batches, TRL pads 2 pairs per micro-batch x 4.

Sides (each in its own process; the median over the steps after `--warmup`):
- `ours-precompute`: `dpo.reference: precompute` (the reference pass runs before step 1);
- `ours-live`: `dpo.reference: live` (a frozen copy forwards every micro-batch);
- `trl-default`: `DPOTrainer` as it comes (a reference copy run on every micro-batch);
- `trl-best`: `precompute_ref_log_probs=True` (TRL 1.16 has no padding-free DPO and no packing;
  this is the fastest setting it offers on a CPU).

FLOPs per pair: ours from our meter (real document lengths, the head on the scored tokens, a live
reference's forward included); TRL's from the same formula over the padded tensors it runs (every
row padded to the micro-batch's longest, the head on every position, the reference forward when
it is live). Peak memory is the process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HH = REPO.parent / "shared" / "data" / "hh_harmless_pairs.jsonl.gz"
MARKERS = {"\n\nHuman:": "user", "\n\nAssistant:": "assistant"}
MAX_LENGTH, LR, BETA = 1024, 1e-6, 0.1
SIDES = ("ours-precompute", "ours-live", "trl-default", "trl-best")


def write_pairs(out: Path, count: int) -> Path:
    """The first `count` HH pairs that parse and whose pair fits one row, as explicit-prompt rows."""
    from posttrain.config.data import SourceConfig
    from posttrain.data.chat import ChatRenderer
    from posttrain.data.rows import FieldError, parse_row
    from posttrain.data.sources import open_source
    from posttrain.train.roles import load_tokenizer, resolve_model_dir

    tokenizer = load_tokenizer(resolve_model_dir("smollm2-135m-instruct"), False)
    renderer = ChatRenderer(tokenizer)
    source = SourceConfig(path=str(HH), dialogue=MARKERS)
    reader, rows = open_source(source), []
    for raw in reader.iter_from(reader.start()):
        try:
            pair = parse_row(raw.load(), source, task="preference")
        except FieldError:
            continue
        samples = renderer.finish([renderer.prepare(pair)])[0].samples
        if sum(len(s) for s in samples) <= MAX_LENGTH:
            rows.append({"prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected})
        if len(rows) == count:
            break
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_ours(args: argparse.Namespace, workdir: Path) -> dict:
    from posttrain.config import load_config
    from posttrain.config.dpo import DPOConfig
    from posttrain.recipes.dpo import run_dpo

    cfg_path = workdir / "ours.yaml"
    cfg_path.write_text(json.dumps({
        "name": "bench", "output_dir": str(workdir),
        "model": {"path": "smollm2-135m-instruct", "activation_checkpointing": True},
        "data": {"task": "preference", "sources": [{"path": str(args.data)}], "max_length": MAX_LENGTH,
                 "epochs": None},
        "train": {"steps": args.steps, "micro_batch_size": 1, "grad_accum": 3, "lr": LR, "schedule": "constant",
                  "precision": "fp32"},
        "dpo": {"loss": "sigmoid", "beta": BETA, "reference": args.side.removeprefix("ours-")},
        "tracking": {"console": False, "tensorboard": False},
        "checkpoint": {"save_at_end": False, "resume": "never"},
    }))
    from posttrain.train.flops import peak_for_precision

    started = time.perf_counter()
    result = run_dpo(load_config(cfg_path, [], DPOConfig))
    meter_peak = peak_for_precision("fp32", "cpu")  # what this process's meter divided by
    total = time.perf_counter() - started
    metrics = [json.loads(x) for x in (Path(result.run_dir) / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "loss" in m and "eval/loss" not in m]
    return {
        "step_s": [m["step_time_s"] for m in steps],
        "pairs": [m["pairs_per_s"] * m["step_time_s"] for m in steps],
        "flops": [m["mfu"] * m["step_time_s"] * meter_peak for m in steps],
        "loss": [m["loss"] for m in steps],
        "setup_and_train_s": total,
        "peak_memory_gib": peak_rss_gib(),
    }


def run_trl(args: argparse.Namespace, workdir: Path) -> dict:
    import datasets
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from posttrain.models.hub import import_model
    from posttrain.train.flops import TransformerShape, training_flops
    from posttrain.models.hf import read_hf_config

    datasets.disable_progress_bars()
    model_dir = import_model("smollm2-135m-instruct")
    shape = TransformerShape.from_model_args(read_hf_config(model_dir)[1])
    dataset = Dataset.from_list([json.loads(line) for line in Path(args.data).read_text().splitlines()])
    live = args.side == "trl-default"
    timings: dict[str, list[float]] = {"step_s": [], "pairs": [], "flops": [], "loss": []}

    class CountingTrainer(DPOTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            rows, length = inputs["input_ids"].shape  # chosen and rejected rows, padded
            self._pairs += rows // 2
            work = training_flops(shape, [length] * rows)
            self._flops += work.total + (work.forward if live else 0)
            return super().training_step(model, inputs, num_items_in_batch)

    class StepClock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            trainer._pairs, trainer._flops = 0, 0.0
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            timings["step_s"].append(time.perf_counter() - self.started)
            timings["pairs"].append(trainer._pairs)
            timings["flops"].append(trainer._flops)

    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    trl_args = DPOConfig(
        output_dir=str(workdir / "trl"), max_steps=args.steps, per_device_train_batch_size=2,
        gradient_accumulation_steps=4, learning_rate=LR, lr_scheduler_type="constant", beta=BETA,
        loss_type=["sigmoid"], max_length=MAX_LENGTH, gradient_checkpointing=True, bf16=False,
        precompute_ref_log_probs=not live, use_cpu=True, report_to=[], save_strategy="no", logging_steps=1,
        dataloader_num_workers=0, seed=0, disable_tqdm=True,
    )
    trainer = CountingTrainer(model=model, args=trl_args, train_dataset=dataset, processing_class=tokenizer,
                              callbacks=[StepClock()])
    trainer.train()
    timings["setup_and_train_s"] = time.perf_counter() - started
    timings["loss"] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    timings["peak_memory_gib"] = peak_rss_gib()
    return timings


def summarise(side: dict, warmup: int, peak: float) -> dict:
    step_s, pairs, flops = side["step_s"][warmup:], side["pairs"][warmup:], side["flops"][warmup:]
    return {
        "sec_per_step": statistics.median(step_s),
        "pairs_per_s": statistics.median(p / s for p, s in zip(pairs, step_s)),
        "pairs_per_step": statistics.median(pairs),
        "gflop_per_pair": statistics.median(f / p for f, p in zip(flops, pairs)) / 1e9,
        "mfu": statistics.median(f / s / peak for f, s in zip(flops, step_s)),
        "peak_memory_gib": side["peak_memory_gib"],
        "setup_and_train_s": side["setup_and_train_s"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=80)
    parser.add_argument("--sides", default=",".join(SIDES))
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        import torch

        torch.manual_seed(0)
        with tempfile.TemporaryDirectory() as tmp:
            fn = run_ours if args.side.startswith("ours") else run_trl
            print("RESULT " + json.dumps(fn(args, Path(tmp))), flush=True)
        return

    import torch

    from posttrain.train.flops import measure_matmul_peak

    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    with tempfile.TemporaryDirectory() as tmp:
        data = write_pairs(Path(tmp) / "pairs.jsonl", args.pairs)
        peak = measure_matmul_peak(torch.float32, "cpu")
        print(f"measured fp32 matmul peak: {peak / 1e9:.0f} GFLOP/s")
        results = {}
        for side in args.sides.split(","):
            proc = subprocess.run([sys.executable, __file__, "--side", side, "--steps", str(args.steps),
                                   "--data", str(data)], capture_output=True, text=True, cwd=REPO, env=env)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                sys.exit(f"{side} failed:\n{proc.stderr[-4000:]}")
            results[side] = summarise(json.loads(line[7:]), args.warmup, peak)
    keys = ("sec_per_step", "pairs_per_s", "pairs_per_step", "gflop_per_pair", "mfu", "peak_memory_gib",
            "setup_and_train_s")
    print(f"\nfp32, AC on, median of {args.steps - args.warmup} steps after {args.warmup} warm-up")
    print(f"{'':20}" + "".join(f"{s:>17}" for s in results))
    for key in keys:
        print(f"{key:20}" + "".join(f"{r[key]:17.3f}" for r in results.values()))
    for ours in ("ours-precompute", "ours-live"):
        for trl in ("trl-default", "trl-best"):
            if ours in results and trl in results:
                a, b = results[ours], results[trl]
                print(f"{ours} / {trl}: pairs/s {a['pairs_per_s'] / b['pairs_per_s']:.2f}x, "
                      f"peak RSS {a['peak_memory_gib'] / b['peak_memory_gib']:.2f}x")
    print("JSON " + json.dumps({"peak_flops": peak, "results": results}))


if __name__ == "__main__":
    main()
