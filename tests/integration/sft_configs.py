"""Small SFT configs on tiny checkpoints and the generated addition task, shared by recipe tests."""

from __future__ import annotations

from pathlib import Path

import yaml


def recipe_config(model_dir: Path, run_root: Path, *, data: dict, train: dict, **sections) -> dict:
    """A recipe config as a dict: the sections every recipe has, then each keyword updates (dict) or
    replaces (other) a section."""
    cfg = {
        "name": "run",
        "output_dir": str(run_root),
        "model": {"path": str(model_dir)},
        "data": {"max_length": 256, "epochs": None, **data},
        "train": {"lr": 1e-3, "micro_batch_size": 2, **train},
        "tracking": {"console": False, "tensorboard": False},
        "checkpoint": {"resume": "never"},
    }
    return merge_sections(cfg, sections)


def write_config(path: Path, model_dir: Path, task_dir: Path, run_root: Path, *, steps: int = 8, **sections) -> Path:
    """Write a YAML SFT config; each keyword updates (dict) or replaces (other) a section."""
    source = {"path": str(task_dir / "train.jsonl"), "fields": {"question": "user", "answer": "assistant"}}
    cfg = recipe_config(model_dir, run_root, data={"sources": [source]},
                        train={"steps": steps, "warmup_steps": 1, "grad_accum": 2})
    path.write_text(yaml.safe_dump(merge_sections(cfg, sections)))
    return path


def merge_sections(cfg: dict, sections: dict) -> dict:
    """`cfg` with each section updated (a dict) or replaced (anything else)."""
    for section, values in sections.items():
        if isinstance(values, dict):
            cfg.setdefault(section, {}).update(values)
        else:
            cfg[section] = values
    return cfg
