"""`make demo`: a short real SFT of the bundled SmolLM2 on a task the demo generates itself.

It writes an addition task (`runs/demo-task/`), measures the model's held-out answers before
training, fine-tunes with `configs/demo.yaml`, measures again, and prints where everything went.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "demo.yaml"


def main(argv: list[str] | None = None) -> int:
    from posttrain.cluster.launch import launch
    from posttrain.config import SFTConfig, load_config
    from posttrain.demo_task import write_task
    from posttrain.models.hub import import_model

    started = time.perf_counter()
    model_dir = import_model("smollm2-135m-instruct")
    print(f"model: {model_dir}")
    train_path, held_out_path = write_task(REPO / "runs" / "demo-task")
    print(f"task: {train_path} (train), {held_out_path} (held out, number pairs unseen in training)")
    overrides = [f"data.sources.0.path={train_path}", f"eval.sources.0.path={held_out_path}",
                 f"output_dir={REPO / 'runs'}", *(argv or [])]
    cfg = load_config(DEMO_CONFIG, overrides, SFTConfig)
    result = launch("posttrain.recipes.sft:run_sft", cfg, cfg.launcher).main

    metrics = [json.loads(line) for line in (Path(result.run_dir) / "metrics.jsonl").read_text().splitlines()]
    before = next(m for m in metrics if "eval/correct" in m)
    after = result.eval
    train_losses = [m["loss"] for m in metrics if "loss" in m]
    print()
    print(f"SFT of SmolLM2-135M-Instruct: {result.steps} steps in {time.perf_counter() - started:.0f} s "
          f"(train loss {train_losses[0]:.3f} -> {train_losses[-1]:.3f})")
    print(f"held-out answers in the form 'A + B = C': {before['eval/format']:.0%} before -> {after['format']:.0%} after")
    print(f"held-out answers exactly right:          {before['eval/correct']:.0%} before -> {after['correct']:.0%} after")
    print(f"held-out loss: {before['eval/loss']:.3f} -> {after['loss']:.3f}")
    print(f"run directory: {result.run_dir} (config.yaml, metrics.jsonl, tb/, checkpoints/)")
    print(f"exported model: {result.export_dir} (loads with transformers.AutoModelForCausalLM)")
    print("next, the same task as a workflow (SFT -> GRPO with the addition reward -> eval):")
    print("  posttrain pipeline configs/pipeline_demo.yaml")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
