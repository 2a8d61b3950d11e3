"""DPO on two ranks (gloo, torchrun-style processes) reproduces the one-rank run for the same
global batch, with the reference precomputed (each rank scores its share of the pairs) or live
(a frozen copy sharded like the policy)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from posttrain.config import load_config
from posttrain.config.dpo import DPOConfig
from posttrain.recipes.dpo import run_dpo
from tests.integration.test_distributed import STEPS, assert_two_ranks_reproduce_one


def write_pairs(path: Path, count: int = 64) -> Path:
    rng = random.Random(0)
    words = ["red", "blue", "green", "cat", "dog", "sun", "rain", "tree", "sea", "hill"]
    rows = []
    for i in range(count):
        prompt = " ".join(rng.choice(words) for _ in range(rng.randint(2, 8))) + "?"
        chosen = " ".join(rng.choice(words) for _ in range(rng.randint(1, 6)))
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": chosen + " no " + str(i)})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("reference", ["precompute", "live"])
def test_two_ranks_reproduce_one(tiny_checkpoints, tmp_path, reference):
    pairs = write_pairs(tmp_path / "pairs.jsonl")
    cfg = {
        "name": "run", "output_dir": str(tmp_path / "one"), "model": {"path": str(tiny_checkpoints["llama"])},
        "data": {"task": "preference", "sources": [{"path": str(pairs)}], "max_length": 128, "epochs": None},
        "train": {"steps": STEPS, "lr": 1e-3, "warmup_steps": 1, "micro_batch_size": 2, "grad_accum": 2},
        "dpo": {"reference": reference},
        "tracking": {"console": False, "tensorboard": False}, "checkpoint": {"resume": "never"},
    }
    _, two = assert_two_ranks_reproduce_one(cfg, tmp_path, "dpo", lambda path: run_dpo(load_config(path, [], DPOConfig)))
    if reference == "precompute":  # each rank wrote the pairs it scored
        parts = sorted(p.name.split("-")[1] for p in (two / "reference").glob("*/s0-r*-p*.safetensors"))
        assert set(parts) == {"r00000", "r00001"}
