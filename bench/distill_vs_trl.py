"""Distillation at a 262,144-token vocabulary: posttrain vs TRL `GKDTrainer` (lmbda=0: supervised
KD with the generalised JSD), same models, tokens, loss and settings.

    python bench/distill_vs_trl.py [--steps 6] [--warmup 2] [--rows 2] [--max-length 512]
                                   [--layers 0,2,4,...] [--side both|ours|trl] [--workdir DIR]

Teacher: the bundled Gemma 3 270M (18 layers, vocabulary 262,144) with a Gemma chat template added
(the bundled base model has none); student: the teacher's `--layers` (default every other one,
9 layers), made once by `models.layer_drop`. Data: GSM8K rows in file order (question -> user,
answer -> assistant), rendered once by our ChatRenderer; TRL receives exactly those token ids and
answer masks through a padding collator, so both sides train the same tokens of the same rows in
the same order: `--rows` conversations per step, one row each (no packing), full fine-tuning in
fp32, AdamW, lr 1e-5, JSD beta 0.5 at temperature 1, loss only on answer tokens, no gradient
accumulation, no activation checkpointing. Each side runs in its own process; reported: the first
step's loss, the median step time and trained tokens/s over the steps after `--warmup`, and the
process's peak RSS.
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
LR, BETA = 1e-5, 0.5
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<start_of_turn>"
    "{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n{{ message['content'] | trim }}"
    "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def prepare(workdir: Path, layers: list[int]) -> tuple[Path, Path]:
    """The teacher (Gemma 3 270M with a chat template) and its layer-dropped student."""
    import shutil

    from posttrain.models.hub import import_model
    from posttrain.models.layer_drop import init_student

    teacher = workdir / "teacher"
    if not (teacher / "chat_template.jinja").exists():
        shutil.copytree(import_model("gemma3-270m"), teacher, dirs_exist_ok=True)
        (teacher / "chat_template.jinja").write_text(GEMMA_TEMPLATE)
    return teacher, init_student(teacher, layers, workdir / "student")


def data_config(args: argparse.Namespace) -> dict:
    rows = args.rows * args.steps
    return {"sources": [{"path": str(GSM8K), "fields": {"question": "user", "answer": "assistant"},
                         "rows": [0, rows]}],
            "max_length": args.max_length, "packing": False, "shuffle": False, "epochs": 1, "prefetch": 0}


def run_ours(args: argparse.Namespace, workdir: Path, teacher: Path, student: Path) -> dict:
    from posttrain.config.distill import DistillConfig
    from posttrain.config.loading import validate_config
    from posttrain.recipes.distill import run_distill

    cfg = validate_config({
        "name": "ours", "output_dir": str(workdir), "model": {"path": str(student)},
        "teacher": {"path": str(teacher)}, "data": data_config(args),
        "train": {"steps": args.steps, "micro_batch_size": args.rows, "grad_accum": 1, "lr": LR,
                  "schedule": "constant", "grad_clip": 1.0, "precision": "fp32"},
        "distill": {"loss": "jsd", "beta": BETA, "temperature": 1.0, "kd_weight": 1.0},
        "eval": {}, "checkpoint": {"every_steps": 10_000, "resume": "never"},
        "tracking": {"console": False, "tensorboard": False},
    }, DistillConfig)
    result = run_distill(cfg)
    steps = [json.loads(x) for x in (Path(result.run_dir) / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if "loss" in s]
    timed = steps[args.warmup:]
    return {"first_loss": steps[0]["loss"], "step_s": statistics.median(s["step_time_s"] for s in timed),
            "trained_tokens_per_s": statistics.median(s["trained_tokens_per_s"] for s in timed),
            "trained_tokens": [b["trained_tokens"] - a for a, b in zip([0] + [s["trained_tokens"] for s in steps], steps)],
            "peak_rss_gib": peak_rss_gib()}


def rendered_rows(args: argparse.Namespace, student: Path) -> list[dict]:
    """Our samples as TRL rows: unshifted labels (-100 on prompt tokens), exactly our tokens."""
    from posttrain.config import DataConfig
    from posttrain.data.loader import build_loader
    from posttrain.train.roles import load_tokenizer

    tokenizer = load_tokenizer(student, False)
    rows = []
    with build_loader(DataConfig.model_validate(data_config(args)), tokenizer, batch_size=1) as loader:
        for batch in loader:
            n = int(batch.cu_seqlens[1])  # the document; padding follows it
            ids, shifted = batch.input_ids[0, :n].tolist(), batch.labels[0, :n].tolist()
            rows.append({"input_ids": ids, "labels": [-100] + shifted[:-1]})
    return rows


def run_trl(args: argparse.Namespace, workdir: Path, teacher: Path, student: Path) -> dict:
    import torch
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    rows = rendered_rows(args, student)
    tokenizer = AutoTokenizer.from_pretrained(student)

    def collate(batch: list[dict]) -> dict:
        width = max(len(r["input_ids"]) for r in batch)
        pad = tokenizer.pad_token_id

        def padded(key: str, fill: int) -> torch.Tensor:
            return torch.tensor([r[key] + [fill] * (width - len(r[key])) for r in batch])

        mask = torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in batch])
        return {"input_ids": padded("input_ids", pad), "attention_mask": mask, "labels": padded("labels", -100)}

    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.start)

    config = GKDConfig(output_dir=str(workdir / "trl"), max_steps=args.steps, per_device_train_batch_size=args.rows,
                       gradient_accumulation_steps=1, learning_rate=LR, lr_scheduler_type="constant",
                       warmup_steps=0, max_grad_norm=1.0, weight_decay=0.0, lmbda=0.0, beta=BETA, temperature=1.0,
                       logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, bf16=False, fp16=False,
                       gradient_checkpointing=False, max_length=args.max_length, dataloader_num_workers=0, seed=0)
    model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32, attn_implementation="sdpa")
    teacher_model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32, attn_implementation="sdpa")
    trainer = GKDTrainer(model=model, teacher_model=teacher_model, args=config, data_collator=collate,
                         train_dataset=Dataset.from_list(rows), processing_class=tokenizer, callbacks=[StepTimer()])
    trainer._get_train_sampler = lambda *a, **k: SequentialSampler(trainer.train_dataset)  # file order, like ours
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    trained = [sum(1 for x in r["labels"][1:] if x != -100) for r in rows]
    per_step = [sum(trained[i * args.rows:(i + 1) * args.rows]) for i in range(args.steps)]
    timed = list(range(args.warmup, args.steps))
    return {"first_loss": losses[0], "step_s": statistics.median(times[i] for i in timed),
            "trained_tokens_per_s": statistics.median(per_step[i] / times[i] for i in timed),
            "trained_tokens": per_step, "peak_rss_gib": peak_rss_gib()}


def child(args: argparse.Namespace) -> None:
    workdir = Path(args.workdir)
    teacher, student = workdir / "teacher", workdir / "student"
    result = (run_ours if args.side == "ours" else run_trl)(args, workdir, teacher, student)
    print("RESULT " + json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rows", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--layers", default=",".join(str(i) for i in range(0, 18, 2)))
    parser.add_argument("--side", default="both", choices=["both", "ours", "trl"])
    parser.add_argument("--workdir")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="distill-vs-trl-"))
    workdir.mkdir(parents=True, exist_ok=True)
    prepare(workdir, [int(x) for x in args.layers.split(",")])
    results = {}
    for side in (["ours", "trl"] if args.side == "both" else [args.side]):
        command = [sys.executable, __file__, "--child", "--side", side, "--workdir", str(workdir),
                   "--steps", str(args.steps), "--warmup", str(args.warmup), "--rows", str(args.rows),
                   "--max-length", str(args.max_length)]
        done = subprocess.run(command, capture_output=True, text=True)
        lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
        if done.returncode != 0 or not lines:
            raise SystemExit(f"{side} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
        results[side] = json.loads(lines[-1][len("RESULT "):])
        print(side, json.dumps(results[side]), flush=True)
    if len(results) == 2:
        ours, trl = results["ours"], results["trl"]
        print(f"same trained tokens per step: {ours['trained_tokens'] == trl['trained_tokens']}")
        print(f"first-step loss: ours {ours['first_loss']:.6f}, TRL {trl['first_loss']:.6f}, "
              f"|diff| {abs(ours['first_loss'] - trl['first_loss']):.2e}")
        print(f"trained tokens/s: ours {ours['trained_tokens_per_s']:.1f}, TRL {trl['trained_tokens_per_s']:.1f}, "
              f"ratio {ours['trained_tokens_per_s'] / trl['trained_tokens_per_s']:.2f}x")
        print(f"peak RSS: ours {ours['peak_rss_gib']:.2f} GiB, TRL {trl['peak_rss_gib']:.2f} GiB, "
              f"ratio {ours['peak_rss_gib'] / trl['peak_rss_gib']:.2f}")


if __name__ == "__main__":
    main()
