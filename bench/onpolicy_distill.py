"""On-policy distillation on CPU: the base SmolLM2-135M-Instruct learns from its own SFT export.

    python bench/onpolicy_distill.py [--steps 15] [--output-dir DIR] [KEY=VALUE ...]

Teacher: the `make demo` SFT export (`runs/demo/export`, answers "A + B = C"); student: the bundled
base model, which answers with paragraphs. `grpo.advantage: teacher_reverse_kl`: the student samples
answers to the demo's training prompts and every sampled token's advantage is
log p_teacher - log p_student. Reports the reverse KL per rollout and on the demo's held-out prompts
(the student's own sampled answers scored by both models) before, during and after training.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from demo_runs import EXPORT as TEACHER
from demo_runs import REPO, TASK, parse_demo_args


def main() -> None:
    args = parse_demo_args(__doc__, steps=15)

    from posttrain.config import load_config
    from posttrain.config.grpo import GRPOConfig
    from posttrain.recipes.grpo import run_grpo

    out = Path(args.output_dir or tempfile.mkdtemp(prefix="onpolicy-distill-"))
    overrides = [
        f"output_dir={out}", "name=onpolicy-distill", "model.path=smollm2-135m-instruct",
        f"teacher.path={TEACHER}", "grpo.advantage=teacher_reverse_kl", "rewards=[]",
        f"data.sources.0.path={TASK / 'train.jsonl'}", f"eval.sources.0.path={TASK / 'held_out.jsonl'}",
        f"train.steps={args.steps}", "rollout.prompts_per_step=4", "rollout.n=4", "rollout.max_new_tokens=24",
        "eval.scorer=null", "eval.every_steps=5", "train.lr=5e-6", "tracking.console=false",
        "checkpoint.every_steps=null", *args.overrides,
    ]
    cfg = load_config(REPO / "configs" / "grpo_demo_addition.yaml", overrides, GRPOConfig)
    started = time.perf_counter()
    result = run_grpo(cfg)
    wall = time.perf_counter() - started
    rows = [json.loads(line) for line in (Path(result.run_dir) / "metrics.jsonl").read_text().splitlines()]
    print(f"{'step':>5} {'rollout reverse KL':>18} {'len':>5} {'step s':>7}")
    for r in rows:
        if "loss" in r:
            print(f"{r['step']:>5} {r['teacher/reverse_kl']:>18.3f} {r['response/length_mean']:>5.1f} "
                  f"{r['step_time_s'] + r['time/rollout_s']:>7.1f}")
    held = [(r["step"], r["eval/teacher_reverse_kl"]) for r in rows if "eval/teacher_reverse_kl" in r]
    print("held-out reverse KL (student's sampled answers):", ", ".join(f"step {s}: {v:.3f}" for s, v in held))
    print(f"wall time {wall / 60:.1f} min; held-out reverse KL {held[0][1]:.3f} -> {held[-1][1]:.3f}")


if __name__ == "__main__":
    main()
