"""`posttrain data ...`: look at what the trainer will see."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="inspect training data")
    sub = data.add_subparsers(dest="data_command", metavar="ACTION")
    sub.required = True
    p = sub.add_parser(
        "inspect",
        help="print rendered samples with trained tokens highlighted and a JSON summary line",
    )
    p.add_argument("config", help="recipe YAML with a data: section (or a YAML holding only it)")
    p.add_argument("--n", type=int, default=3, help="samples to print (default 3)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer directory or bundled model name (default: the recipe's model)")
    p.add_argument("--max-length", type=int, default=None, help="override data.max_length")
    p.set_defaults(func=_cmd_inspect)


def _cmd_inspect(args: argparse.Namespace) -> int:
    import yaml

    from posttrain.config.data import DataConfig
    from posttrain.data.inspect import inspect_data

    path = Path(args.config)
    if not path.exists():
        raise FileNotFoundError(f"config {path} not found")
    doc = yaml.safe_load(path.read_text()) or {}
    section = doc.get("data", doc) if isinstance(doc, dict) else None
    if not isinstance(section, dict):
        raise ValueError(f"{path}: expected a mapping with a data: section")
    if args.max_length is not None:
        section = {**section, "max_length": args.max_length}
    try:
        cfg = DataConfig.model_validate(section)
    except Exception as err:  # pydantic's ValidationError: show it as a user error
        raise ValueError(f"{path}: invalid data section:\n{err}") from None
    tokenizer = _load_tokenizer(args.tokenizer or _tokenizer_from(doc, path))
    inspect_data(cfg, tokenizer, n=args.n)
    return 0


def _tokenizer_from(doc: dict, path: Path) -> str:
    """The tokenizer of a recipe: `tokenizer:`, or the model's path/name."""
    candidates = [doc.get("tokenizer")]
    model = doc.get("model")
    if isinstance(model, str):
        candidates.append(model)
    elif isinstance(model, dict):
        candidates += [model.get(k) for k in ("tokenizer", "path", "name_or_path", "name")]
    for value in candidates:
        if isinstance(value, str) and value:
            return value
    raise ValueError(f"{path}: no tokenizer or model path found; pass --tokenizer")


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
