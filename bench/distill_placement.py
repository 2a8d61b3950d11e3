"""Where the distillation teacher runs: in the student's rank (`colocated`) or in a Ray actor of its
own (`teacher.placement: separate`), on the same CPUs.

    python bench/distill_placement.py [--steps 8] [--warmup 2] [--cpus 2] [--output-dir DIR] [KEY=VALUE ...]

`configs/distill_smollm2_gsm8k.yaml` (teacher SmolLM2-135M-Instruct, a 15-layer student from its
even layers, GSM8K answers in packed rows of 1,024 tokens, 2 micro-batches per step, fp32, live
teacher) on the Ray backend with one rank, both arms in this run:

    colocated   the rank has all `--cpus` CPUs and runs the teacher's forward itself
    separate    the rank has `--cpus - 1` CPUs, the teacher actor 1 (each micro-batch is sent to
                the teacher before the student's forward, so the two overlap)

Prints per arm the median step time after `--warmup` steps, trained tokens/s, the rank's peak RSS
(the teacher's weights and activations leave it under `separate`), the teacher actor's peak RSS
(read from /proc while the run goes), the first step's loss (the two must agree) and, for
`separate`, the median time a micro-batch waited for the teacher.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GSM8K = REPO.parent / "shared" / "data" / "gsm8k_train.jsonl"
CONFIG = REPO / "configs" / "distill_smollm2_gsm8k.yaml"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--output-dir")
    parser.add_argument("overrides", nargs="*")
    return parser.parse_args()


def watch_teacher_rss(peaks: list[float], stop: threading.Event) -> None:
    """Keep the largest peak RSS (VmHWM) seen of any teacher actor process, in GiB."""
    while not stop.wait(0.5):
        for status in Path("/proc").glob("[0-9]*/status"):
            try:
                if b"TeacherActor" not in (status.parent / "cmdline").read_bytes():
                    continue
                text = status.read_text()
            except OSError:
                continue
            kib = next((int(line.split()[1]) for line in text.splitlines() if line.startswith("VmHWM")), 0)
            peaks.append(kib / 2**20)


def run_arm(arm: str, args: argparse.Namespace, out: Path) -> list[dict]:
    from posttrain.cluster.launch import launch
    from posttrain.config import load_config
    from posttrain.config.distill import DistillConfig
    from posttrain.recipes.distill import run_distill

    rank_cpus = args.cpus if arm == "colocated" else args.cpus - 1
    overrides = [f"name={arm}", f"output_dir={out}", f"data.sources.0.path={GSM8K}", "data.sources.0.rows=[0, 200]",
                 "data.epochs=null", f"train.steps={args.steps}", "train.micro_batch_size=1", "train.grad_accum=2",
                 "eval={}", "checkpoint.every_steps=1000", "checkpoint.resume=never", "tracking.console=false",
                 "launcher.backend=ray", "launcher.num_workers=1", f"launcher.cpus_per_worker={rank_cpus}",
                 f"teacher.placement={arm}", "teacher.cpus=1", *args.overrides]
    cfg = load_config(CONFIG, overrides, DistillConfig)
    peaks: list[float] = []
    stop = threading.Event()
    watcher = threading.Thread(target=watch_teacher_rss, args=(peaks, stop), daemon=True)
    watcher.start()
    try:
        result = launch(run_distill, cfg, cfg.launcher).main
    finally:
        stop.set()
        watcher.join()
    rows = [json.loads(line) for line in (Path(result.run_dir) / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    steps[0]["teacher_peak_rss_gb"] = max(peaks, default=None)
    return steps


def summary(rows: list[dict], warmup: int) -> dict:
    timed = rows[warmup:]
    waits = [r["distill/teacher_wait_s"] for r in timed if "distill/teacher_wait_s" in r]
    return {"step_s": statistics.median(r["step_time_s"] for r in timed),
            "trained_tok_s": statistics.median(r["trained_tokens_per_s"] for r in timed),
            "peak_rss_gb": max(r["peak_memory_gb"] for r in rows), "first_loss": rows[0]["loss"],
            "teacher_peak_rss_gb": rows[0]["teacher_peak_rss_gb"],
            "teacher_wait_s": statistics.median(waits) if waits else None}


def main() -> None:
    args = parse_args()
    if args.cpus < 2:
        raise SystemExit("--cpus must be at least 2 (one for the teacher actor under separate)")
    out = Path(args.output_dir or tempfile.mkdtemp(prefix="distill-placement-"))
    from posttrain.cluster.ray_runtime import init_ray
    from posttrain.config.launcher import LauncherConfig

    init_ray(LauncherConfig(backend="ray"), num_cpus=args.cpus)
    results = {arm: summary(run_arm(arm, args, out), args.warmup) for arm in ("colocated", "separate")}
    print(f"{'arm':<10} {'step s':>7} {'trained tok/s':>14} {'rank peak RSS GB':>17} {'teacher actor GB':>17} "
          f"{'first loss':>12} {'wait s':>7}")
    for arm, r in results.items():
        wait = "-" if r["teacher_wait_s"] is None else f"{r['teacher_wait_s']:.3f}"
        actor = "-" if r["teacher_peak_rss_gb"] is None else f"{r['teacher_peak_rss_gb']:.2f}"
        print(f"{arm:<10} {r['step_s']:>7.2f} {r['trained_tok_s']:>14.1f} {r['peak_rss_gb']:>17.2f} {actor:>17} "
              f"{r['first_loss']:>12.7f} {wait:>7}")
    a, b = results["colocated"], results["separate"]
    print(f"separate vs colocated: step time {b['step_s'] / a['step_s']:.2f}x, rank peak RSS "
          f"{b['peak_rss_gb'] / a['peak_rss_gb']:.2f}x, first loss rel. diff "
          f"{abs(a['first_loss'] - b['first_loss']) / abs(a['first_loss']):.1e}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
