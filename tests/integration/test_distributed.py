"""Two ranks (gloo, torchrun-style processes) reproduce the one-rank SFT run for the same global batch.

The one-rank run reads 2 rows x 2 micro-batches per step; FSDP2 over 2 ranks reads 1 row x 2
micro-batches on each rank (the same 4 rows); TP=2 ranks both read the one-rank run's rows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from posttrain.cluster.dist_env import find_free_port
from posttrain.config import SFTConfig, load_config
from posttrain.recipes.sft import run_sft
from tests.integration.sft_configs import write_config as _write_config

REPO = Path(__file__).resolve().parents[2]
STEPS = 6


def write_config(path: Path, model_dir: Path, task_dir: Path, run_root: Path, **sections) -> Path:
    return _write_config(path, model_dir, task_dir, run_root, steps=STEPS, **sections)


def run_ranks(world: int, config: Path, *overrides: str, timeout: float = 600) -> list[str]:
    """Run `posttrain sft` as `world` torchrun-style processes; returns each rank's stdout."""
    port = str(find_free_port("127.0.0.1"))
    procs = []
    for rank in range(world):
        env = {**os.environ, "PYTHONPATH": str(REPO), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
               "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
               "LOCAL_WORLD_SIZE": str(world), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-m", "posttrain", "sft", str(config), *overrides],
                                      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = []
    try:
        for rank, proc in enumerate(procs):
            out, err = proc.communicate(timeout=timeout)
            assert proc.returncode == 0, f"rank {rank} failed:\n{err[-4000:]}"
            outputs.append(out)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return outputs


def losses(run_dir: Path) -> list[float]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [m["loss"] for m in lines if "loss" in m]


def assert_same_run(one: Path, two: Path, weights_atol: float) -> None:
    a, b = losses(one), losses(two)
    assert len(a) == len(b) == STEPS
    for step, (x, y) in enumerate(zip(a, b), start=1):
        assert abs(x - y) <= 1e-5 * abs(x), (step, a, b)
    for name in ("model.safetensors", "adapter/adapter_model.safetensors"):
        if not (one / "export" / name).exists():
            continue
        want, got = load_file(one / "export" / name), load_file(two / "export" / name)
        assert want.keys() == got.keys()
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=weights_atol, msg=key)


def one_rank(config: Path) -> Path:
    cfg = load_config(config, [], SFTConfig)
    return Path(run_sft(cfg).run_dir)


@pytest.mark.parametrize(
    "family, overrides, lora",
    [
        ("qwen2", ["train.micro_batch_size=1"], False),  # FSDP2 dp_shard=2; tied embedding, biases
        ("llama", ["parallel.tp=2"], True),  # TP=2 with LoRA adapters on every projection
    ],
    ids=["fsdp2", "tp2-lora"],
)
def test_two_ranks_reproduce_one(tiny_checkpoints, task_dir, tmp_path, family, overrides, lora):
    extra = {"lora": {"enabled": True, "rank": 4, "alpha": 8}} if lora else {}
    config = write_config(tmp_path / "cfg.yaml", tiny_checkpoints[family], task_dir, tmp_path / "one", **extra)
    one = one_rank(config)
    outputs = run_ranks(2, config, f"output_dir={tmp_path / 'two'}", *overrides)
    two = tmp_path / "two" / "run"
    summary = json.loads(outputs[0].strip().splitlines()[-1])
    assert summary["status"] == "finished" and summary["export"] == str(two / "export")
    assert_same_run(one, two, weights_atol=2e-5)


@pytest.mark.parametrize("saved_by, resumed_by", [(2, 1), (1, 2)], ids=["2to1", "1to2"])
def test_resume_on_another_world_size(tiny_checkpoints, task_dir, tmp_path, saved_by, resumed_by):
    """A checkpoint taken at step 3 by one world size finishes the run on the other, identically."""
    config = write_config(tmp_path / "cfg.yaml", tiny_checkpoints["llama"], task_dir, tmp_path / "straight",
                          checkpoint={"every_steps": 3})
    straight = one_rank(config)  # 1 rank: 2 rows x 2 micro-batches per step
    per_rank = {1: [], 2: ["train.micro_batch_size=1"]}  # the same 4 rows per step on 2 ranks

    if saved_by == 1:
        checkpoint = straight / "checkpoints" / "step_3"
    else:
        run_ranks(2, config, f"output_dir={tmp_path / 'saver'}", *per_rank[2])
        checkpoint = tmp_path / "saver" / "run" / "checkpoints" / "step_3"
    overrides = [f"output_dir={tmp_path / 'resumed'}", f"checkpoint.resume={checkpoint}", *per_rank[resumed_by]]
    if resumed_by == 1:
        resumed = Path(run_sft(load_config(config, overrides, SFTConfig)).run_dir)
    else:
        run_ranks(2, config, *overrides)
        resumed = tmp_path / "resumed" / "run"

    want = losses(straight)[3:]
    got = losses(resumed)
    assert len(got) == STEPS - 3
    for x, y in zip(want, got):
        assert abs(x - y) <= 1e-5 * abs(x), (want, got)
    a, b = load_file(straight / "export" / "model.safetensors"), load_file(resumed / "export" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=2e-5, msg=key)
