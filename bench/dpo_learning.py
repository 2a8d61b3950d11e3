"""Learning check: does DPO on HH-RLHF harmless pairs teach SmolLM2 a preference that holds out?

    python bench/dpo_learning.py [--train-rows 380] [--held-out 450] [--max-length 512] [KEY=VALUE ...]

Trains `configs/dpo_smollm2_hh.yaml` (SmolLM2-135M-Instruct, sigmoid DPO, beta 0.1, fp32,
`reference: precompute`) on the first `--train-rows` rows of the shared 1,800 HH harmless pairs for
one epoch and holds the next `--held-out` rows out; overrides (e.g. LoRA, lr) are applied last.
The run's final held-out evaluation gives the preference accuracy (share of held-out pairs whose
implicit reward margin `beta * ((logp_c - ref_c) - (logp_r - ref_r))` is positive), reported with
its standard error and its distance from 50% in standard errors, and the mean margin. Before
training every margin is 0: the policy is the reference.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HH = REPO.parent / "shared" / "data" / "hh_harmless_pairs.jsonl.gz"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-rows", type=int, default=380)
    parser.add_argument("--held-out", type=int, default=450, help="rows after the training rows held out")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--output-dir", help="keep the run here (default: a temporary directory); a rerun "
                        "with the same data reuses its precomputed reference table")
    parser.add_argument("overrides", nargs="*", help="config overrides KEY=VALUE, applied last")
    args = parser.parse_args()

    from posttrain.config import load_config
    from posttrain.config.dpo import DPOConfig
    from posttrain.evaluation.held_out import held_out_batches
    from posttrain.recipes.dpo import run_dpo
    from posttrain.train.roles import load_tokenizer, resolve_model_dir

    with tempfile.TemporaryDirectory() as tmp:
        tmp = args.output_dir or tmp
        cfg = load_config(REPO / "configs" / "dpo_smollm2_hh.yaml", [
            f"data.sources.0.path={HH}", f"data.sources.0.rows=[0,{args.train_rows}]",
            f"eval.sources.0.path={HH}", f"eval.sources.0.rows=[{args.train_rows},{args.train_rows + args.held_out}]",
            f"data.max_length={args.max_length}", "data.max_skipped_fraction=0.1",
            "eval.at_start=false", "eval.every_steps=null", "checkpoint.save_at_end=false",
            "eval.max_samples=null", "checkpoint.resume=never",
            f"output_dir={tmp}", "tracking.console=false", *args.overrides,
        ], DPOConfig)
        start = time.perf_counter()
        result = run_dpo(cfg)
        wall = time.perf_counter() - start
        metrics = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
        steps = [m for m in metrics if "loss" in m and "eval/loss" not in m]

        model_dir = resolve_model_dir(cfg.model.path)
        tokenizer = load_tokenizer(model_dir, False)
        batches = held_out_batches(cfg.data, cfg.eval.sources, tokenizer, batch_size=cfg.train.micro_batch_size,
                                   rank=0, world_size=1, max_samples=None)
        pairs = sum(b.num_documents for b in batches) // 2
        accuracy = result.eval["rewards/accuracies"]  # the run's final held-out evaluation
        report = {
            "steps": result.steps, "status": result.status, "wall_s": round(wall, 1),
            "train_pairs": sum(m["pairs_per_s"] * m["step_time_s"] for m in steps),
            "first_losses": [round(m["loss"], 4) for m in steps[:5]],
            "last_losses": [round(m["loss"], 4) for m in steps[-5:]],
            "train_accuracy_last10": sum(m["rewards/accuracies"] for m in steps[-10:]) / len(steps[-10:]),
            "held_out_pairs": pairs,
            "held_out_before": {"accuracy": 0.0, "margin": 0.0, "note": "policy == reference: every margin is 0"},
            "held_out_after": {"accuracy": accuracy, "accuracy_se": math.sqrt(accuracy * (1 - accuracy) / pairs),
                               "z_vs_50pct": (accuracy - 0.5) / math.sqrt(0.25 / pairs),
                               "margin": result.eval["rewards/margins"], "loss": result.eval["loss"],
                               "logps_chosen": result.eval["logps/chosen"],
                               "logps_rejected": result.eval["logps/rejected"]},
            "mean_pairs_per_s": sum(m["pairs_per_s"] for m in steps) / len(steps),
            "mean_mfu": sum(m["mfu"] for m in steps) / len(steps),
        }
        print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
