"""`posttrain sft CONFIG [key=value ...]`: load the config, launch the recipe, print a summary."""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    sft = subparsers.add_parser(
        "sft",
        help="supervised fine-tuning",
        description="Supervised fine-tuning from a YAML config; override any key as key=value "
        "(e.g. train.lr=2e-5 lora.enabled=true).",
    )
    sft.add_argument("config", help="recipe YAML file")
    sft.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    sft.set_defaults(func=_cmd_sft)


def _cmd_sft(args: argparse.Namespace) -> int:
    from posttrain.cluster.launch import launch
    from posttrain.config import SFTConfig, load_config
    from posttrain.tracking import check_tracking_packages

    cfg = load_config(args.config, args.overrides, SFTConfig)
    check_tracking_packages(cfg.tracking)
    result = launch("posttrain.recipes.sft:run_sft", cfg, cfg.launcher).main
    summary = {
        "run_dir": result.run_dir,
        "status": result.status,
        "steps": result.steps,
        "final_loss": result.losses[-1] if result.losses else None,
        "eval": result.eval,
        "export": result.export_dir,
    }
    print(json.dumps(summary))
    return 0
