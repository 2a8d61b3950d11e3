"""`posttrain sft|dpo|distill|grpo CONFIG [key=value ...]`: load the config, launch the recipe, print a summary."""

from __future__ import annotations

import argparse
import importlib
import json

# command -> (help, config class "module:name", SPMD entry "module:function")
RECIPES = {
    "sft": ("supervised fine-tuning", "posttrain.config:SFTConfig", "posttrain.recipes.sft:run_sft"),
    "dpo": ("preference optimisation (DPO, IPO, hinge, robust, SimPO)", "posttrain.config.dpo:DPOConfig",
            "posttrain.recipes.dpo:run_dpo"),
    "distill": ("knowledge distillation (forward/reverse KL, JSD; live teacher or top-k table)",
                "posttrain.config.distill:DistillConfig", "posttrain.recipes.distill:run_distill"),
    "grpo": ("on-policy RL (GRPO, Dr. GRPO, RLOO, GSPO, DAPO options) with verifiable rewards",
             "posttrain.config.grpo:GRPOConfig", "posttrain.recipes.grpo:run_grpo"),
}


def register(subparsers: argparse._SubParsersAction) -> None:
    for command, (help_text, _, _) in RECIPES.items():
        parser = subparsers.add_parser(
            command,
            help=help_text,
            description=f"{help_text[0].upper()}{help_text[1:]} from a YAML config; override any key as "
            "key=value (e.g. train.lr=2e-5 lora.enabled=true).",
        )
        parser.add_argument("config", help="recipe YAML file")
        parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
        parser.set_defaults(func=_run_recipe, recipe=command)


def _load(spec: str):
    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


def _run_recipe(args: argparse.Namespace) -> int:
    from posttrain.cluster.launch import launch
    from posttrain.config import load_config
    from posttrain.tracking import check_tracking_packages

    _, config_class, entry = RECIPES[args.recipe]
    cfg = load_config(args.config, args.overrides, _load(config_class))
    check_tracking_packages(cfg.tracking)
    result = launch(entry, cfg, cfg.launcher).main
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
