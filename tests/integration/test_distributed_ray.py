"""Fault tolerance end to end: SIGKILL one of two Ray workers mid-run; the launcher restarts the
group, the run resumes from its newest checkpoint and ends exactly where an uninterrupted run ends."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from posttrain.cluster import DistEnv
from posttrain.cluster.launch import launch
from posttrain.config import SFTConfig, load_config
from posttrain.recipes.sft import run_sft
from posttrain.train.trainer import TrainResult
from posttrain.demo_task import write_task
from tests.integration.test_distributed import write_config

STEPS, EVERY = 12, 4


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("task")
    write_task(out, train=200, held_out=8)
    return out


def sft_recording_pid(cfg: SFTConfig, env: DistEnv, attempt: int) -> TrainResult:
    """`run_sft`, after leaving this worker's pid where the test can find it."""
    pids = Path(cfg.output_dir) / "pids"
    pids.mkdir(parents=True, exist_ok=True)
    (pids / f"rank{env.rank}-attempt{attempt}").write_text(str(os.getpid()))
    return run_sft(cfg, env, attempt)


def _kill_after_checkpoint(root: Path, killed: list[int], stop: threading.Event) -> None:
    """SIGKILL rank 1 of the first attempt once the first checkpoint is complete."""
    marker = root / "run" / "checkpoints" / f"step_{EVERY}" / "meta.json"
    pid_file = root / "pids" / "rank1-attempt0"
    while not stop.is_set():
        if marker.exists() and pid_file.exists():
            pid = int(pid_file.read_text())
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
            return
        time.sleep(0.005)


def _metrics(run_dir: Path) -> dict[int, dict]:
    """The last record of every step (steps after the restart point are logged twice)."""
    out: dict[int, dict] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            out[record["step"]] = record
    return out


def test_sigkilled_worker_restarts_and_resumes_exactly(ray_instance, tiny_checkpoints, task_dir, tmp_path):
    train = {"steps": STEPS, "micro_batch_size": 1, "grad_accum": 2, "warmup_steps": 2}
    launcher = {"backend": "ray", "num_workers": 2, "cpus_per_worker": 1, "max_restarts": 1}
    configs = {}
    for name in ("straight", "killed"):
        path = write_config(tmp_path / f"{name}.yaml", tiny_checkpoints["llama"], task_dir, tmp_path / name,
                            train=train, launcher=launcher,
                            checkpoint={"every_steps": EVERY, "resume": "auto", "keep_last": 3})
        configs[name] = load_config(path, [], SFTConfig)

    straight = launch(sft_recording_pid, configs["straight"], configs["straight"].launcher)
    assert straight.restarts == 0

    killed: list[int] = []
    stop = threading.Event()
    killer = threading.Thread(target=_kill_after_checkpoint, args=(tmp_path / "killed", killed, stop), daemon=True)
    killer.start()
    try:
        result = launch(sft_recording_pid, configs["killed"], configs["killed"].launcher)
    finally:
        stop.set()
        killer.join()
    assert killed, "the run ended before a worker could be killed"
    assert result.restarts == 1 and [(f.rank, f.kind) for f in result.failures] == [(1, "died")]
    assert result.main.status == "finished" and result.main.steps == STEPS

    a, b = _metrics(tmp_path / "straight" / "run"), _metrics(tmp_path / "killed" / "run")
    assert sorted(b) == list(range(1, STEPS + 1))
    assert [b[s]["loss"] for s in b] == [a[s]["loss"] for s in b]  # bit for bit
    assert b[STEPS]["restarts"] == 1 and a[STEPS]["restarts"] == 0  # the metrics show the restart
    assert all(b[s]["restarts"] == 0 for s in range(1, EVERY + 1))  # resumed, not started over

    want = load_file(tmp_path / "straight" / "run" / "export" / "model.safetensors")
    got = load_file(tmp_path / "killed" / "run" / "export" / "model.safetensors")
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key
