"""Small GRPO configs on tiny checkpoints and the demo's addition prompts."""

from __future__ import annotations

from pathlib import Path

from posttrain.config.grpo import GRPOConfig
from posttrain.config.loading import validate_config
from tests.integration.sft_configs import merge_sections, recipe_config


def grpo_config(model_dir: Path, task_dir: Path, run_root: Path, *, steps: int = 2, **sections) -> dict:
    """A GRPO recipe config as a dict; each keyword updates (dict) or replaces (other) a section."""
    source = {"path": str(task_dir / "train.jsonl"), "fields": {"question": "prompt", "answer": "reference"}}
    defaults = {"rollout": {"prompts_per_step": 2, "n": 4, "max_new_tokens": 12}, "rewards": [{"fn": "addition"}],
                "reward_workers": {"processes": 0}}
    cfg = recipe_config(model_dir, run_root, data={"task": "prompt", "sources": [source], "max_length": 128},
                        train={"steps": steps}, **defaults)
    return merge_sections(cfg, sections)


def load(cfg: dict) -> GRPOConfig:
    return validate_config(cfg, GRPOConfig)
