"""Learning check: does a short SFT teach SmolLM2 GSM8K's answer form (and help accuracy)?

    python bench/gsm8k_learning.py [--steps 30] [--held-out 100] [--precision fp32|bf16_autocast]
                                   [KEY=VALUE ...]   (config overrides, e.g. train.lr=1e-4)

Holds out the last `--held-out` GSM8K rows, trains on the rest with `configs/sft_smollm2_gsm8k.yaml`
(full fine-tuning, 4 packed rows of 1024 tokens per step), and scores greedy answers (up to the
config's 512 new tokens, with its repetition penalty; `eval.repetition_penalty=1` for plain greedy)
to the held-out questions before and after: `format` = the answer ends in `#### <number>`,
`correct` = that number is the reference's.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GSM8K = REPO.parent / "shared" / "data" / "gsm8k_train.jsonl"


def _median_chars(samples: list[dict]) -> int:
    lengths = sorted(len(x["response"]) for x in samples)
    return lengths[len(lengths) // 2] if lengths else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--held-out", type=int, default=100)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--samples-out", help="write the final evaluation's answers (JSONL) here")
    parser.add_argument("overrides", nargs="*", help="config overrides KEY=VALUE, applied last")
    args = parser.parse_args()

    from posttrain.config import SFTConfig, load_config
    from posttrain.recipes.sft import run_sft

    lines = GSM8K.read_text().splitlines()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "train.jsonl").write_text("\n".join(lines[: -args.held_out]) + "\n")
        (tmp / "held_out.jsonl").write_text("\n".join(lines[-args.held_out :]) + "\n")
        cfg = load_config(
            REPO / "configs" / "sft_smollm2_gsm8k.yaml",
            [
                f"data.sources.0.path={tmp / 'train.jsonl'}",
                f"eval.sources.0.path={tmp / 'held_out.jsonl'}",
                f"eval.max_samples={args.held_out}",
                "eval.at_start=true",
                "eval.every_steps=null",
                f"train.steps={args.steps}",
                f"train.precision={args.precision}",
                f"output_dir={tmp / 'runs'}",
                "checkpoint.save_at_end=false",
                "tracking.console=false",
                *args.overrides,
            ],
            SFTConfig,
        )
        started = time.perf_counter()
        result = run_sft(cfg)
        metrics = [json.loads(x) for x in (Path(result.run_dir) / "metrics.jsonl").read_text().splitlines()]
        samples_text = (Path(result.run_dir) / "eval" / f"step_{result.steps}.jsonl").read_text()
        samples = [json.loads(x) for x in samples_text.splitlines()]
        if args.samples_out:
            Path(args.samples_out).write_text(samples_text)
    before = next(m for m in metrics if "eval/format" in m)
    after = result.eval
    losses = [m["loss"] for m in metrics if "loss" in m]
    print(f"{result.steps} steps in {time.perf_counter() - started:.0f} s; train loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    print(f"greedy answers, up to {cfg.eval.max_new_tokens} tokens, repetition penalty {cfg.eval.repetition_penalty}")
    print(f"held-out answers ending in '#### <number>': {before['eval/format']:.0%} -> {after['format']:.0%}")
    print(f"held-out final-answer accuracy:            {before['eval/correct']:.0%} -> {after['correct']:.0%}")
    print(f"held-out loss:                             {before['eval/loss']:.3f} -> {after['loss']:.3f}")
    misses = [x for x in samples if not x["format"]]
    print(f"answers without the form: {len(misses)}, of which {sum('####' in x['response'] for x in misses)} "
          f"contain '####' elsewhere; their median length {_median_chars(misses)} characters")
    print("JSON " + json.dumps({"before": {k.removeprefix('eval/'): v for k, v in before.items() if k.startswith('eval/')},
                                "after": after, "steps": result.steps}))


if __name__ == "__main__":
    main()
