"""`posttrain data ...`: look at what the trainer will see."""

from __future__ import annotations

import argparse
from pathlib import Path


MARKING = (
    "Marking: on a terminal trained tokens are green and context is dim; piped, trained tokens are "
    "between [[ and ]]. A control-token string in the content that data.special_tokens: escape "
    "encoded as plain text is underlined magenta on a terminal and between \u00ab and \u00bb piped, "
    "so it is never mistaken for the template's real control token. A legend line says the same."
)


def register(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="inspect training data")
    sub = data.add_subparsers(dest="data_command", metavar="ACTION")
    sub.required = True
    p = sub.add_parser(
        "inspect",
        help="print rendered samples with trained tokens highlighted and a JSON summary line",
        description="Render the first samples of a recipe's data exactly as training does, mark the "
        "trained tokens, then stream all of the data once and print a JSON summary line. The config "
        "is loaded and checked like the recipe commands' (line numbers, did-you-mean, key=value "
        "overrides). " + MARKING,
    )
    p.add_argument("config", help="recipe YAML with a data: section (or a YAML holding only it)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted config overrides, e.g. data.max_length=512")
    p.add_argument("--n", type=int, default=3, help="samples to print (default 3)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer directory or bundled model name (default: the recipe's model)")
    p.add_argument("--max-length", type=int, default=None, help="override data.max_length")
    p.set_defaults(func=_cmd_inspect)


def _cmd_inspect(args: argparse.Namespace) -> int:
    from posttrain.config.inspect import inspect_config_class
    from posttrain.config.loading import load_config
    from posttrain.data.inspect import inspect_data

    overrides = list(args.overrides)
    if args.max_length is not None:
        overrides.append(f"data.max_length={args.max_length}")
    cfg = load_config(args.config, overrides, inspect_config_class())
    teacher = cfg.teacher.get("path") if isinstance(cfg.teacher, dict) else None  # a student made from it
    name = args.tokenizer or cfg.tokenizer or (cfg.model.path if cfg.model is not None else None) or teacher
    if not name:
        raise ValueError(f"{args.config}: no model.path, teacher.path or tokenizer to read the tokenizer from; "
                         "pass --tokenizer")
    inspect_data(cfg.data, _load_tokenizer(name), n=args.n)
    return 0


def _load_tokenizer(name: str):
    from transformers import AutoTokenizer

    from posttrain.models import hub

    path = Path(name).expanduser()
    if not path.exists() and name in hub.BUNDLED:
        path = hub.default_model_dir(name)
        if not hub.is_imported(path):
            raise FileNotFoundError(
                f"bundled model {name} is not imported; run `posttrain models import {name}`"
            )
    if not path.exists():
        raise FileNotFoundError(f"tokenizer {name!r} not found (a directory or a bundled model name)")
    return AutoTokenizer.from_pretrained(str(path))
