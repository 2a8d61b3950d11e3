"""Learning check for distillation: does a layer-dropped student learn more from the teacher than
from the answers alone?

    python bench/distill_learning.py [--steps 40] [--train-rows 400] [--held-out 64] [--generate 32]
                                     [--arms ce,kd,topk] [--output-dir DIR] [KEY=VALUE ...]

Teacher: SmolLM2-135M-Instruct (30 layers). Student: 15 layers, the teacher's even layers
(`model.init_from`), made once. Data: the first `--train-rows` GSM8K rows (question -> user,
answer -> assistant; `configs/distill_smollm2_gsm8k.yaml` with packed rows of 512 tokens, 2 per
step). Equal steps of three arms, each timed whole (model loads and, for topk, the teacher's pass):

    ce       cross-entropy on the answers only (`posttrain sft` on the student)
    kd       forward KL to the live teacher, mixed 50/50 with the CE (`posttrain distill`)
    topk     the same loss from a top-k table (k = 64) made by one pass before training
    ce_time  CE only again, for as many steps as fit in the kd arm's wall time

Afterwards every model (the student before training, each arm's export, the teacher) is measured
the same way on `--held-out` GSM8K rows never trained on: full-vocabulary KL(teacher || student)
and CE on the reference answers per answer token, top-1 agreement with the teacher, and the share
of greedy answers (to `--generate` questions) that end in GSM8K's `#### <number>` form.
Overrides (e.g. `train.lr=5e-5`) apply to every arm.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
GSM8K = REPO.parent / "shared" / "data" / "gsm8k_train.jsonl"
CONFIG = REPO / "configs" / "distill_smollm2_gsm8k.yaml"
HELD_OUT_START = 7000  # GSM8K train has 7,473 rows; the held-out rows come from its end


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--train-rows", type=int, default=400)
    parser.add_argument("--held-out", type=int, default=64)
    parser.add_argument("--generate", type=int, default=32)
    parser.add_argument("--arms", default="ce,kd,topk,ce_time")
    parser.add_argument("--output-dir")
    parser.add_argument("overrides", nargs="*")
    return parser.parse_args()


def arm_overrides(args: argparse.Namespace, out: Path) -> list[str]:
    """Every arm's settings; no evaluation during training (each model is measured afterwards)."""
    return [f"output_dir={out}", f"data.sources.0.path={GSM8K}", f"data.sources.0.rows=[0, {args.train_rows}]",
            "data.max_length=512", "data.epochs=null", f"train.steps={args.steps}", "train.micro_batch_size=2",
            "train.grad_accum=1", f"train.warmup_steps={min(4, args.steps)}", "eval={}",
            "checkpoint.every_steps=1000", "checkpoint.resume=never", "tracking.console=false", *args.overrides]


def held_out_source(rows: int):
    from posttrain.config import SourceConfig

    return SourceConfig(path=str(GSM8K), fields={"question": "user", "answer": "assistant"},
                        rows=(HELD_OUT_START, HELD_OUT_START + rows))


def run_arm(arm: str, student: Path, args: argparse.Namespace, out: Path, steps: int | None = None) -> dict:
    from posttrain.config import SFTConfig, load_config
    from posttrain.config.distill import DistillConfig
    from posttrain.recipes.distill import run_distill
    from posttrain.recipes.sft import run_sft

    common = arm_overrides(args, out) + ([f"train.steps={steps}"] if steps else [])
    started = time.perf_counter()
    if arm.startswith("ce"):
        cfg = load_config(CONFIG, [f"name={arm}", *common], DistillConfig)
        sft = SFTConfig.model_validate({**cfg.model_dump(exclude={"teacher", "distill", "model"}),
                                        "model": {"path": str(student)}})
        result = run_sft(sft)
    else:
        signal = ["distill.teacher_signal=topk"] if arm == "topk" else []
        cfg = load_config(CONFIG, [f"name={arm}", *common, "model.init_from=null", f"model.path={student}", *signal],
                          DistillConfig)
        result = run_distill(cfg)
    seconds = time.perf_counter() - started
    rows = [json.loads(line) for line in (Path(result.run_dir) / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    return {"export": result.export_dir, "seconds": seconds, "steps": len(steps),
            "median_step_s": sorted(r["step_time_s"] for r in steps)[len(steps) // 2],
            "loss_first": steps[0]["loss"], "loss_last": steps[-1]["loss"]}


def held_out_metrics(model_dir: Path, teacher, args: argparse.Namespace, out: Path) -> dict:
    """Full-vocabulary KL to the teacher, CE on the answers, agreement; greedy format compliance."""
    from posttrain.config import load_config
    from posttrain.config.distill import DistillConfig
    from posttrain.evaluation.generation import held_out_prompts, scored_generations
    from posttrain.evaluation.held_out import held_out_batches
    from posttrain.models.hf import load_hf
    from posttrain.ops.distill import DistillLoss
    from posttrain.train.distill import DistillationObjective
    from posttrain.train.roles import load_tokenizer
    from posttrain.train.step import evaluate_objective

    cfg = load_config(CONFIG, ["name=eval", *arm_overrides(args, out)], DistillConfig)
    tokenizer = load_tokenizer(model_dir, False)
    model = load_hf(model_dir)
    batches = held_out_batches(cfg.data, [held_out_source(args.held_out)], tokenizer, batch_size=2, rank=0,
                               world_size=1, max_samples=None)
    objective = DistillationObjective(DistillLoss("forward_kl"), teacher=teacher)
    metrics = evaluate_objective(model, batches, objective, precision="fp32", device=torch.device("cpu"),
                                 dp_group=None)
    prompts = held_out_prompts([held_out_source(args.generate)], None)
    samples = scored_generations(model, tokenizer, prompts, "gsm8k", max_new_tokens=256,
                                 repetition_penalty=1.05)
    return {"kl": metrics["distill/divergence"], "ce": metrics["distill/ce"],
            "agreement": metrics["distill/agreement"],
            "format": sum(s["format"] for s in samples) / len(samples),
            "correct": sum(s["correct"] for s in samples) / len(samples)}


def main() -> None:
    args = parse_args()
    from posttrain.config.model import FrozenModelConfig
    from posttrain.models.hub import import_model
    from posttrain.models.layer_drop import init_student
    from posttrain.train.roles import build_frozen

    torch.manual_seed(0)
    out = Path(args.output_dir or tempfile.mkdtemp(prefix="distill-learning-"))
    out.mkdir(parents=True, exist_ok=True)
    teacher_dir = import_model("smollm2-135m-instruct")
    student = init_student(teacher_dir, list(range(0, 30, 2)), out / "student_init")
    arms: dict[str, dict] = {}
    for arm in args.arms.split(","):
        steps = None
        if arm == "ce_time":  # CE-only for as many steps as fit in KD's wall time
            steps = round(args.steps * arms["kd"]["seconds"] / arms["ce"]["seconds"])
        arms[arm] = run_arm(arm, student, args, out, steps)
    teacher = build_frozen(FrozenModelConfig(path=str(teacher_dir)), model_dir=teacher_dir, device=torch.device("cpu"))
    models = {"teacher": teacher_dir, "student (start)": student,
              **{f"student ({arm})": Path(r["export"]) for arm, r in arms.items()}}
    measured = {name: held_out_metrics(path, teacher, args, out) for name, path in models.items()}
    results = {"arms": arms, "held_out": measured, "args": vars(args)}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print("| arm | steps | wall s | median step s | loss first -> last |")
    print("| --- | --- | --- | --- | --- |")
    for arm, r in arms.items():
        print(f"| {arm} | {r['steps']} | {r['seconds']:.0f} | {r['median_step_s']:.2f} | "
              f"{r['loss_first']:.3f} -> {r['loss_last']:.3f} |")
    print("\n| model | KL(teacher||student) | CE on answers | top-1 agreement | format | correct |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, m in measured.items():
        print(f"| {name} | {m['kl']:.4f} | {m['ce']:.4f} | {m['agreement']:.3f} | {m['format']:.0%} | "
              f"{m['correct']:.0%} |")
    print(f"\nresults: {out / 'results.json'}")


if __name__ == "__main__":
    main()
