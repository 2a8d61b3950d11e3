"""SFT throughput and memory: posttrain vs TRL `SFTTrainer`, same model, data and settings.

    python bench/sft_vs_trl.py [--steps 7] [--warmup 2] [--precisions fp32,bf16]
                               [--activation-checkpointing on|off] [--device cpu|cuda]
                               [--model-dir DIR] [--data JSONL] [--compile on|off]

Both sides train SmolLM2-135M-Instruct on GSM8K (prompt = question, completion = answer, loss on
the completion only), packed rows of 1024 tokens, 1 row per micro-batch x 4 micro-batches per
optimiser step (~4,096 tokens), AdamW, on this machine's CPU (or its first GPU with `--device
cuda`), with activation checkpointing per block on both sides or off on both (on is TRL's default).
Each side runs in its own process and reports the median over the steps after `--warmup`; peak
memory is the process's RSS on CPU and `torch.cuda.max_memory_allocated` on a GPU. `bf16` means
bf16 autocast with fp32 weights on both sides. `--compile on` compiles on both sides (ours per
block, TRL through `torch_compile`). `--model-dir` replaces the bundled model by another
HF directory (e.g. the same architecture with random weights, where the bundled one is absent).
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
GSM8K = REPO.parent / "shared" / "data" / "gsm8k_train.jsonl"
MAX_LENGTH, MICRO, ACCUM, LR = 1024, 1, 4, 1e-5


def peak_memory_gib(device: str) -> float:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def model_dir_for(args: argparse.Namespace) -> Path:
    if args.model_dir:
        return Path(args.model_dir)
    from posttrain.models.hub import import_model

    return import_model("smollm2-135m-instruct")


def run_ours(args: argparse.Namespace, workdir: Path) -> dict:
    from posttrain.config import SFTConfig, load_config
    from posttrain.recipes.sft import run_sft

    precision, model_dir = args.precision, model_dir_for(args)
    cfg_path = workdir / "ours.yaml"
    cfg_path.write_text(json.dumps({
        "name": f"bench-{precision}",
        "output_dir": str(workdir),
        "model": {"path": str(model_dir), "activation_checkpointing": args.activation_checkpointing == "on",
                  "compile": args.compile == "on"},
        "data": {"sources": [{"path": str(args.data), "fields": {"question": "user", "answer": "assistant"}}],
                 "max_length": MAX_LENGTH, "epochs": None},
        "train": {"steps": args.steps, "micro_batch_size": MICRO, "grad_accum": ACCUM, "lr": LR,
                  "schedule": "constant", "precision": "fp32" if precision == "fp32" else "bf16_autocast"},
        "tracking": {"console": False, "tensorboard": False},
        "checkpoint": {"save_at_end": False, "resume": "never"},
    }))
    cfg = load_config(cfg_path, getattr(args, "overrides", []), SFTConfig)
    result = run_sft(cfg)
    metrics = [json.loads(x) for x in (Path(result.run_dir) / "metrics.jsonl").read_text().splitlines()]
    steps_m = [m for m in metrics if "loss" in m]
    return {
        "step_s": [m["step_time_s"] for m in steps_m],
        "trained_tokens": [m["trained_tokens_per_s"] * m["step_time_s"] for m in steps_m],
        "tokens": [m["tokens_per_s"] * m["step_time_s"] for m in steps_m],
        "mfu": [m["mfu"] for m in steps_m],
        "compile_s": [m.get("compile_s", 0.0) for m in steps_m],
        "loss": [m["loss"] for m in steps_m],
        "peak_memory_gib": steps_m[-1]["peak_memory_gb"],
    }


def run_trl(args: argparse.Namespace, workdir: Path) -> dict:
    import datasets
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    datasets.disable_progress_bars()
    model_dir, on_gpu = model_dir_for(args), args.device == "cuda"
    rows = [json.loads(line) for line in Path(args.data).read_text().splitlines()]
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

    def sync() -> None:
        if on_gpu:  # the step's kernels have finished when its clock stops
            torch.cuda.synchronize()

    class StepClock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            trainer._tokens = trainer._trained = 0
            sync()
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            sync()
            timings["step_s"].append(time.perf_counter() - self.started)
            timings["tokens"].append(trainer._tokens)
            timings["trained_tokens"].append(trainer._trained)

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    trl_args = SFTConfig(
        output_dir=str(workdir / "trl"), max_steps=args.steps, per_device_train_batch_size=MICRO,
        gradient_accumulation_steps=ACCUM, learning_rate=LR, lr_scheduler_type="constant",
        max_length=MAX_LENGTH, packing=True, completion_only_loss=True,
        gradient_checkpointing=args.activation_checkpointing == "on", bf16=args.precision == "bf16",
        torch_compile=args.compile == "on", use_cpu=not on_gpu, report_to=[], save_strategy="no", logging_steps=1,
        dataloader_num_workers=0, seed=0, disable_tqdm=True,
    )
    trainer = TimedTrainer(model=model, args=trl_args, train_dataset=dataset, processing_class=tokenizer,
                           callbacks=[StepClock()])
    trainer.train()
    timings["loss"] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    timings["peak_memory_gib"] = peak_memory_gib(args.device)
    return timings


def summarise(side: dict, warmup: int) -> dict:
    step_s = side["step_s"][warmup:]
    per_step = [t / s for t, s in zip(side["trained_tokens"][warmup:], step_s)]
    out = {
        "sec_per_step": statistics.median(step_s),
        "trained_tokens_per_s": statistics.median(per_step),
        "tokens_per_step": statistics.median(side["tokens"][warmup:]),
        "peak_memory_gib": side["peak_memory_gib"],
    }
    if "mfu" in side:
        out["mfu"] = statistics.median(side["mfu"][warmup:])
    if side.get("loss"):
        out["first_loss"] = side["loss"][0]
    return out


def child(args: argparse.Namespace) -> None:
    import torch

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        fn = run_ours if args.side == "ours" else run_trl
        print("RESULT " + json.dumps(fn(args, Path(tmp))), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--activation-checkpointing", choices=["on", "off"], default="on")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--compile", choices=["on", "off"], default="off")
    parser.add_argument("--model-dir", help="HF model directory (default: the bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--data", default=str(GSM8K), help="GSM8K-style JSONL (question, answer)")
    parser.add_argument("--side", choices=["ours", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--precision", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        return child(args)

    from posttrain.train.flops import measure_matmul_peak
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is visible to torch")
    env = dict(os.environ)
    if args.device == "cpu":  # both sides on the CPU even where a GPU is visible (ours would pick it)
        env["CUDA_VISIBLE_DEVICES"] = ""

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    peaks = {name: measure_matmul_peak(dtypes[name], args.device) for name in args.precisions.split(",")}
    print("measured matmul peak: " + ", ".join(f"{name} {peak / 1e9:.0f} GFLOP/s" for name, peak in peaks.items()))
    for precision in args.precisions.split(","):
        results = {}
        for side in ("ours", "trl"):
            proc = subprocess.run(
                [sys.executable, __file__, "--side", side, "--precision", precision, "--steps", str(args.steps),
                 "--activation-checkpointing", args.activation_checkpointing, "--device", args.device,
                 "--compile", args.compile,
                 "--data", args.data, *(["--model-dir", args.model_dir] if args.model_dir else [])],
                capture_output=True, text=True, cwd=REPO, env=env,
            )
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                sys.exit(f"{side} ({precision}) failed:\n{proc.stderr[-4000:]}")
            results[side] = summarise(json.loads(line[7:]), args.warmup)
        ours, trl = results["ours"], results["trl"]
        print(f"\n{precision} on {args.device}, activation checkpointing {args.activation_checkpointing}, "
              f"compile {args.compile}: "
              f"median of {args.steps - args.warmup} steps after {args.warmup} warm-up")
        print(f"{'':24}{'posttrain':>12}{'TRL':>12}{'ours/TRL':>10}")
        for key in ("sec_per_step", "trained_tokens_per_s", "tokens_per_step", "peak_memory_gib"):
            print(f"{key:24}{ours[key]:12.2f}{trl[key]:12.2f}{ours[key] / trl[key]:10.2f}")
        print(f"{'posttrain MFU':24}{ours['mfu']:12.1%}  (vs measured {precision} matmul peak)")
        print("JSON " + json.dumps({"precision": precision, "device": args.device,
                                    "activation_checkpointing": args.activation_checkpointing,
                                    "compile": args.compile,
                                    "ours": ours, "trl": trl}))


if __name__ == "__main__":
    main()
