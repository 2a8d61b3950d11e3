"""SFT throughput and memory: posttrain vs TRL `SFTTrainer`, same model, data and settings.

    python bench/sft_vs_trl.py [--steps 7] [--warmup 2] [--precisions fp32,bf16]
                               [--activation-checkpointing on|off]

Both sides train SmolLM2-135M-Instruct on GSM8K (prompt = question, completion = answer, loss on
the completion only), packed rows of 1024 tokens, 1 row per micro-batch x 4 micro-batches per
optimiser step (~4,096 tokens), AdamW, on this machine's CPU, with activation checkpointing per
block on both sides or off on both (on is TRL's default). Each side runs in its own process (peak
RSS is the process's), and reports the median over the steps after `--warmup`. `bf16` means bf16
autocast with fp32 weights on both sides.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GSM8K = REPO.parent / "shared" / "data" / "gsm8k_train.jsonl"
MAX_LENGTH, MICRO, ACCUM, LR = 1024, 1, 4, 1e-5


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_ours(steps: int, precision: str, checkpointing: bool, workdir: Path) -> dict:
    from posttrain.config import SFTConfig, load_config
    from posttrain.models.hub import import_model
    from posttrain.recipes.sft import run_sft

    model_dir = import_model("smollm2-135m-instruct")
    cfg_path = workdir / "ours.yaml"
    cfg_path.write_text(json.dumps({
        "name": f"bench-{precision}",
        "output_dir": str(workdir),
        "model": {"path": str(model_dir), "activation_checkpointing": checkpointing},
        "data": {"sources": [{"path": str(GSM8K), "fields": {"question": "user", "answer": "assistant"}}],
                 "max_length": MAX_LENGTH, "epochs": None},
        "train": {"steps": steps, "micro_batch_size": MICRO, "grad_accum": ACCUM, "lr": LR,
                  "schedule": "constant", "precision": "fp32" if precision == "fp32" else "bf16_autocast"},
        "tracking": {"console": False, "tensorboard": False},
        "checkpoint": {"save_at_end": False, "resume": "never"},
    }))
    cfg = load_config(cfg_path, [], SFTConfig)
    result = run_sft(cfg)
    metrics = [json.loads(x) for x in (Path(result.run_dir) / "metrics.jsonl").read_text().splitlines()]
    steps_m = [m for m in metrics if "loss" in m]
    return {
        "step_s": [m["step_time_s"] for m in steps_m],
        "trained_tokens": [m["trained_tokens_per_s"] * m["step_time_s"] for m in steps_m],
        "tokens": [m["tokens_per_s"] * m["step_time_s"] for m in steps_m],
        "mfu": [m["mfu"] for m in steps_m],
        "loss": [m["loss"] for m in steps_m],
        "peak_rss_gib": steps_m[-1]["peak_memory_gb"],
    }


def run_trl(steps: int, precision: str, checkpointing: bool, workdir: Path) -> dict:
    import datasets
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from posttrain.models.hub import import_model

    datasets.disable_progress_bars()
    model_dir = import_model("smollm2-135m-instruct")
    rows = [json.loads(line) for line in GSM8K.read_text().splitlines()]
    dataset = Dataset.from_list([
        {"prompt": [{"role": "user", "content": r["question"]}],
         "completion": [{"role": "assistant", "content": r["answer"]}]}
        for r in rows
    ])
    timings: dict[str, list[float]] = {"step_s": [], "trained_tokens": [], "tokens": [], "loss": []}

    class TimedTrainer(SFTTrainer):
        """Times each optimiser step and counts its tokens from the micro-batches it sees."""

        def training_step(self, model, inputs, num_items_in_batch=None):
            labels = inputs["labels"]
            self._tokens += int(inputs["input_ids"].numel())
            self._trained += int((labels[..., 1:] != -100).sum())  # HF shifts labels inside the loss
            return super().training_step(model, inputs, num_items_in_batch)

    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            trainer._tokens = trainer._trained = 0
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            timings["step_s"].append(time.perf_counter() - self.started)
            timings["tokens"].append(trainer._tokens)
            timings["trained_tokens"].append(trainer._trained)

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    args = SFTConfig(
        output_dir=str(workdir / "trl"), max_steps=steps, per_device_train_batch_size=MICRO,
        gradient_accumulation_steps=ACCUM, learning_rate=LR, lr_scheduler_type="constant",
        max_length=MAX_LENGTH, packing=True, completion_only_loss=True, gradient_checkpointing=checkpointing,
        bf16=precision == "bf16", use_cpu=True, report_to=[], save_strategy="no", logging_steps=1,
        dataloader_num_workers=0, seed=0, disable_tqdm=True,
    )
    trainer = TimedTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                           callbacks=[StepClock()])
    trainer.train()
    timings["loss"] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    timings["peak_rss_gib"] = rss_gib()
    return timings


def summarise(side: dict, warmup: int) -> dict:
    step_s = side["step_s"][warmup:]
    per_step = [t / s for t, s in zip(side["trained_tokens"][warmup:], step_s)]
    out = {
        "sec_per_step": statistics.median(step_s),
        "trained_tokens_per_s": statistics.median(per_step),
        "tokens_per_step": statistics.median(side["tokens"][warmup:]),
        "peak_rss_gib": side["peak_rss_gib"],
    }
    if "mfu" in side:
        out["mfu"] = statistics.median(side["mfu"][warmup:])
    return out


def child(args: argparse.Namespace) -> None:
    import torch

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        fn = run_ours if args.side == "ours" else run_trl
        checkpointing = args.activation_checkpointing == "on"
        print("RESULT " + json.dumps(fn(args.steps, args.precision, checkpointing, Path(tmp))), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--activation-checkpointing", choices=["on", "off"], default="on")
    parser.add_argument("--side", choices=["ours", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--precision", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        return child(args)

    from posttrain.train.flops import measure_matmul_peak
    import torch

    peaks = {"fp32": measure_matmul_peak(torch.float32), "bf16": measure_matmul_peak(torch.bfloat16)}
    print(f"measured matmul peak: fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s")
    for precision in args.precisions.split(","):
        results = {}
        for side in ("ours", "trl"):
            proc = subprocess.run(
                [sys.executable, __file__, "--side", side, "--precision", precision, "--steps", str(args.steps),
                 "--activation-checkpointing", args.activation_checkpointing],
                capture_output=True, text=True, cwd=REPO,
            )
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                sys.exit(f"{side} ({precision}) failed:\n{proc.stderr[-4000:]}")
            results[side] = summarise(json.loads(line[7:]), args.warmup)
        ours, trl = results["ours"], results["trl"]
        print(f"\n{precision}, activation checkpointing {args.activation_checkpointing}: "
              f"median of {args.steps - args.warmup} steps after {args.warmup} warm-up")
        print(f"{'':24}{'posttrain':>12}{'TRL':>12}{'ours/TRL':>10}")
        for key in ("sec_per_step", "trained_tokens_per_s", "tokens_per_step", "peak_rss_gib"):
            print(f"{key:24}{ours[key]:12.2f}{trl[key]:12.2f}{ours[key] / trl[key]:10.2f}")
        print(f"{'posttrain MFU':24}{ours['mfu']:12.1%}  (vs measured {precision} matmul peak)")
        print("JSON " + json.dumps({"precision": precision, "activation_checkpointing": args.activation_checkpointing,
                                    "ours": ours, "trl": trl}))


if __name__ == "__main__":
    main()
