"""Small GRPO configs on tiny checkpoints and the demo's addition prompts."""

from __future__ import annotations

from pathlib import Path

from posttrain.config.grpo import GRPOConfig
from posttrain.config.loading import validate_config
from tests.integration.sft_configs import merge_sections


def grpo_config(model_dir: Path, task_dir: Path, run_root: Path, *, steps: int = 2, **sections) -> dict:
    """A GRPO recipe config as a dict; each keyword updates (dict) or replaces (other) a section."""
    cfg = {
        "name": "run",
        "output_dir": str(run_root),
        "model": {"path": str(model_dir)},
        "data": {
            "task": "prompt",
            "sources": [{"path": str(task_dir / "train.jsonl"), "fields": {"question": "prompt", "answer": "reference"}}],
            "max_length": 128,
            "epochs": None,
        },
        "train": {"steps": steps, "lr": 1e-3, "micro_batch_size": 2},
        "rollout": {"prompts_per_step": 2, "n": 4, "max_new_tokens": 12},
        "rewards": [{"fn": "addition"}],
        "reward_workers": {"processes": 0},
        "tracking": {"console": False, "tensorboard": False},
        "checkpoint": {"resume": "never"},
    }
    return merge_sections(cfg, sections)


def load(cfg: dict) -> GRPOConfig:
    return validate_config(cfg, GRPOConfig)
