"""What the benches that start from the `make demo` outputs share: their paths and command line."""

from __future__ import annotations

import argparse
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TASK = REPO / "runs" / "demo-task"
EXPORT = REPO / "runs" / "demo" / "export"


def parse_demo_args(doc: str, *, steps: int, extra: list[tuple[str, dict]] = ()) -> argparse.Namespace:
    """`--steps`, `--output-dir`, any `extra` options and trailing KEY=VALUE overrides; exits when
    the demo's SFT export is missing."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=steps)
    for flag, options in extra:
        parser.add_argument(flag, **options)
    parser.add_argument("--output-dir", help="keep the run here (default: a temporary directory)")
    parser.add_argument("overrides", nargs="*", help="config overrides KEY=VALUE, applied last")
    args = parser.parse_args()
    if not (EXPORT / "config.json").exists():
        raise SystemExit(f"no SFT export at {EXPORT}; run `make demo` first")
    return args
