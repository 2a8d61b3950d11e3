"""Learning check: GRPO with the addition reward, from the `make demo` SFT export.

    python bench/grpo_learning.py [--steps 60] [--held-out 100] [--output-dir DIR] [KEY=VALUE ...]

Starts from `runs/demo/export` (run `make demo` first), draws prompts from the demo's training
task (`runs/demo-task/train.jsonl`) and measures greedy exact answers on `--held-out` prompts whose
number pairs appear neither in training nor in the demo's own held-out file, before training and
every `eval.every_steps`. Prints the reward and held-out accuracy curves and the wall time;
overrides (e.g. `lora.enabled=true train.lr=5e-5`) are applied last.
"""

from __future__ import annotations

import json
import re
import tempfile
import time
from pathlib import Path

from demo_runs import EXPORT as INIT
from demo_runs import REPO, TASK, parse_demo_args


def write_held_out(path: Path, count: int) -> Path:
    """`count` addition prompts over number pairs unseen in the demo's training and held-out files."""
    from posttrain.demo_task import make_rows

    seen = set()
    for name in ("train.jsonl", "held_out.jsonl"):
        for line in (TASK / name).read_text().splitlines():
            a, b = re.match(r"(\d+) \+ (\d+)", json.loads(line)["answer"]).groups()
            seen.add((int(a), int(b)))
    rows = make_rows(seed=7_000, count=count, exclude=seen)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def main() -> None:
    args = parse_demo_args(__doc__, steps=60, extra=[("--held-out", {"type": int, "default": 100})])

    from posttrain.config import load_config
    from posttrain.config.grpo import GRPOConfig
    from posttrain.recipes.grpo import run_grpo

    out = Path(args.output_dir or tempfile.mkdtemp(prefix="grpo-learning-"))
    out.mkdir(parents=True, exist_ok=True)
    held_out = write_held_out(out / "held_out.jsonl", args.held_out)
    overrides = [f"output_dir={out}", f"model.path={INIT}", f"data.sources.0.path={TASK / 'train.jsonl'}",
                 f"eval.sources.0.path={held_out}", f"train.steps={args.steps}", "tracking.console=false",
                 *args.overrides]
    cfg = load_config(REPO / "configs" / "grpo_demo_addition.yaml", overrides, GRPOConfig)
    started = time.perf_counter()
    result = run_grpo(cfg)
    wall = time.perf_counter() - started
    report(Path(result.run_dir) / "metrics.jsonl", wall)


def report(metrics_path: Path, wall: float) -> None:
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval/correct" in r]
    print(f"{'step':>5} {'reward':>7} {'train acc':>9} {'len':>5} {'step s':>7} {'rollout s':>9}")
    for r in steps:
        print(f"{r['step']:>5} {r.get('reward/mean', float('nan')):>7.3f} "
              f"{r.get('reward/addition/correct', float('nan')):>9.3f} {r.get('response/length_mean', 0):>5.1f} "
              f"{r['step_time_s']:>7.1f} {r.get('time/rollout_s', 0):>9.1f}")
    print("held-out exact accuracy (greedy):", ", ".join(f"step {r['step']}: {r['eval/correct']:.1%}" for r in evals))
    print(f"wall time: {wall / 60:.1f} min; first -> last held-out accuracy: "
          f"{evals[0]['eval/correct']:.1%} -> {evals[-1]['eval/correct']:.1%}")


if __name__ == "__main__":
    main()
