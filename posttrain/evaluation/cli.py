"""`posttrain eval CONFIG [key=value ...]` or `posttrain eval --model DIR --data FILE --scorer NAME`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval", help="score one model's answers to held-out prompts",
        description="Answers (greedy, or sampled with --temperature) of a model directory to held-out "
        "chat rows, scored by a scorer; writes samples.jsonl and summary.json and prints a table. "
        "Give a YAML config (EvaluateConfig) or the flags.")
    parser.add_argument("config", nargs="?", help="EvaluateConfig YAML file")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    parser.add_argument("--model", help="HF model directory or bundled model name")
    parser.add_argument("--data", action="append", help="held-out JSONL/Parquet file (repeatable)")
    parser.add_argument("--fields", help="column mapping, e.g. question=user,answer=assistant")
    parser.add_argument("--scorer", help="scorer name or package.module:function")
    parser.add_argument("--n", type=int, help="evaluate the first N prompts")
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--output", help="results directory (default runs/eval)")
    parser.set_defaults(func=_run)


def config_from_flags(args: argparse.Namespace) -> dict:
    """The EvaluateConfig mapping the flags describe (missing ones are left to validation)."""
    fields = dict(item.split("=", 1) for item in args.fields.split(",")) if args.fields else {}
    data: dict = {"sources": [{"path": p, "fields": fields} for p in args.data or []]}
    for key, value in (("scorer", args.scorer), ("max_samples", args.n), ("max_new_tokens", args.max_new_tokens),
                       ("temperature", args.temperature)):
        if value is not None:
            data[key] = value
    if args.model is not None:
        data["model"] = {"path": args.model}
    if args.output is not None:
        out = Path(args.output)
        data["output_dir"], data["name"] = str(out.parent), out.name
    return data


def _run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from posttrain.config.evaluate import EvaluateConfig
    from posttrain.config.loading import apply_overrides, load_config, validate_config
    from posttrain.evaluation.standalone import run_eval, summary_table

    if args.config and "=" in args.config and not Path(args.config).exists():
        args.overrides, args.config = [args.config, *args.overrides], None  # flags then overrides, no file
    if args.config:
        cfg = load_config(args.config, args.overrides, EvaluateConfig)
    else:
        cfg = validate_config(apply_overrides(config_from_flags(args), args.overrides), EvaluateConfig, "flags")
    summary = run_eval(cfg)
    Console(stderr=True).print(summary_table({cfg.name: summary}, f"{cfg.scorer} on {summary['samples']} prompts"))
    print(json.dumps({"run_dir": str(cfg.run_dir), **summary}))
    return 0
