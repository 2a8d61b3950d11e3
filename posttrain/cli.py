"""Command line: `posttrain <command> ...`.

Each command group lives next to the code it drives and exposes `register(subparsers)`; this
module only assembles them, so adding a command never touches another group's code.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules that each define `register(subparsers)`.
COMMAND_MODULES = (
    "posttrain.models.cli",
    "posttrain.data.cli",
    "posttrain.recipes.cli",
    "posttrain.evaluation.cli",
    "posttrain.pipeline.cli",
)


def build_parser() -> argparse.ArgumentParser:
    from posttrain import __version__

    parser = argparse.ArgumentParser(
        prog="posttrain",
        description="Post-training for open-weight LLMs: SFT, DPO, distillation and GRPO.",
    )
    parser.add_argument("--version", action="version", version=f"posttrain {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    from posttrain.tracking.logs import enable_console_logging

    parser = build_parser()
    args = parser.parse_args(argv)
    enable_console_logging()
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as err:
        print(f"posttrain: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
