"""Small DPO configs on tiny checkpoints, a synthetic preference file, and helpers the DPO test
modules share (their fixtures live in conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from posttrain.config.dpo import DPOConfig
from posttrain.config.loading import validate_config
from posttrain.recipes.dpo import run_dpo
from tests.integration.sft_configs import merge_sections, recipe_config

FILLER = ("please", "think", "carefully", "about", "this", "small", "sum", "and", "answer", "briefly")


def synthetic_pairs(n: int = 32, *, variant: str = "") -> list[dict]:
    """`n` explicit prompt/chosen/rejected rows of varied lengths (every reply differs from its pair's)."""
    rows = []
    for i in range(n):
        a, b = 3 * i + 1, (7 * i) % 23
        prompt = f"{variant}Q{i}: what is {a} plus {b}? " + " ".join(FILLER[: i % 7])
        chosen = f"{a} + {b} = {a + b}." + " It is " * (i % 3) + ("" if i % 4 else " Done.")
        rejected = f"Maybe {a + b + 1 + i % 5}" + " or so" * (1 + i % 4)
        rows.append({"prompt": prompt.strip(), "chosen": chosen, "rejected": rejected})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_pairs(path: Path, n: int = 32, *, variant: str = "") -> Path:
    return write_jsonl(path, synthetic_pairs(n, variant=variant))


def dpo_config(model_dir: Path, data_path: Path, run_root: Path, *, steps: int = 2, **sections) -> dict:
    """A DPO recipe config as a dict; each keyword updates (dict) or replaces (other) a section."""
    cfg = recipe_config(model_dir, run_root, data={"task": "preference", "sources": [{"path": str(data_path)}]},
                        train={"steps": steps, "warmup_steps": 1, "grad_accum": 2}, dpo={"reference": "precompute"})
    return merge_sections(cfg, sections)


def write_config(path: Path, model_dir: Path, data_path: Path, run_root: Path, **kwargs) -> Path:
    """Write `dpo_config(...)` as YAML to `path`."""
    path.write_text(yaml.safe_dump(dpo_config(model_dir, data_path, run_root, **kwargs)))
    return path


REPO = Path(__file__).resolve().parents[2]
HH_MARKERS = {"\n\nHuman:": "user", "\n\nAssistant:": "assistant"}
# Logged per step but not a function of the data and weights.
TIMING_KEYS = {"time", "mfu", "step_time_s", "peak_memory_gb", "tokens_per_s", "trained_tokens_per_s", "pairs_per_s"}










def hh_source(path: Path, rows: list | None = None) -> dict:
    return {"path": str(path), "dialogue": HH_MARKERS, **({"rows": rows} if rows else {})}


def run(model_dir: Path, data_path: Path, run_root: Path, **sections):
    return run_dpo(validate_config(dpo_config(model_dir, data_path, run_root, **sections), DPOConfig))


def logged(run_dir: str | Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def per_step(run_dir: str | Path, prefix: str = "") -> dict[int, dict[str, float]]:
    """Training (`prefix=""`: lines with a loss) or evaluation (`"eval/"`) metrics by step."""
    key = f"{prefix}loss"
    return {m["step"]: {k: v for k, v in m.items() if k not in TIMING_KEYS and k != "step"}
            for m in logged(run_dir) if key in m}


def cache_dirs(run_dir: str | Path) -> list[Path]:
    return sorted(p for p in (Path(run_dir) / "reference").iterdir() if p.is_dir())


def read_table(directory: Path) -> dict[int, torch.Tensor]:
    """pair id -> reference sums (chosen, rejected), from every part file of a cache directory."""
    table = {}
    for part in sorted(directory.glob("s*-r*-p*.safetensors")):
        tensors = load_file(part)
        for pair, sums in zip(tensors["ids"].tolist(), tensors["sums"]):
            table.setdefault(pair, sums)
    return table



