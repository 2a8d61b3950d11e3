"""Resuming a real run under faults: a corrupt newest checkpoint, a changed config, a second run
on the same directory. Each outcome and message is checked."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from posttrain.config import ConfigError, SFTConfig, load_config
from posttrain.recipes.sft import run_sft
from posttrain.train.checkpoint_io import CheckpointError, load_metadata
from posttrain.train.run_dir import RunDirLocked, lock_run_dir
from posttrain.train.schedules import lr_factor
from tests.integration.sft_configs import write_config

TRAIN = {"steps": 4, "lr": 1e-3, "warmup_steps": 1, "schedule": "cosine"}
CHECKPOINT = {"resume": "auto", "every_steps": 2, "keep_last": 3}


@pytest.fixture
def config(tiny_checkpoints, task_dir, tmp_path):
    path = write_config(tmp_path / "cfg.yaml", tiny_checkpoints["llama"], task_dir, tmp_path, train=TRAIN,
                        checkpoint=CHECKPOINT)
    return lambda *overrides: load_config(path, list(overrides), SFTConfig)


@pytest.fixture
def logs(caplog):
    caplog.set_level(logging.INFO, logger="posttrain")
    return caplog


def _metrics(run_dir: Path) -> dict[int, dict]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {m["step"]: m for m in lines if "loss" in m}


def _flip_tensor_bytes(checkpoint: Path) -> Path:
    metadata = load_metadata(checkpoint / ".metadata")
    info = max(metadata.storage_data.values(), key=lambda i: i.length)
    shard = checkpoint / info.relative_path
    data = bytearray(shard.read_bytes())
    middle = info.offset + info.length // 2
    data[middle : middle + 64] = bytes(b ^ 0x5A for b in data[middle : middle + 64])
    shard.write_bytes(bytes(data))
    return shard


def test_a_corrupt_checkpoint_falls_back_to_the_previous_one(config, logs):
    first = run_sft(config())
    run_dir = Path(first.run_dir)
    shard = _flip_tensor_bytes(run_dir / "checkpoints" / "step_4")

    resumed = run_sft(config())
    assert resumed.status == "finished" and resumed.steps == 4
    assert resumed.losses == pytest.approx(first.losses[2:], rel=1e-6)  # steps 3-4 again, from step_2
    warning = next(r.getMessage() for r in logs.records if r.levelno == logging.WARNING)
    assert f"{run_dir / 'checkpoints' / 'step_4'} is corrupt: {shard.name}: sha256 mismatch" in warning
    assert "falling back to the previous complete checkpoint" in warning
    assert any("resuming from step_2 (" in r.getMessage() and "2 steps done" in r.getMessage()
               for r in logs.records)

    _flip_tensor_bytes(run_dir / "checkpoints" / "step_4")  # written again by the resumed run
    with pytest.raises(CheckpointError) as err:
        run_sft(config("checkpoint.on_corrupt=raise"))
    assert f"{shard.name}: sha256 mismatch" in str(err.value)
    assert f"the newest intact checkpoint is {run_dir / 'checkpoints' / 'step_2'}" in str(err.value)


def test_the_export_carries_checksums(config):
    import shutil
    import subprocess

    from posttrain.train.export import SUMS_FILE, verify_sums

    export = Path(run_sft(config()).export_dir)
    assert export.name == "export" and not (export.parent / ".tmp-export").exists()
    listed = [line.split("  ", 1)[1] for line in (export / SUMS_FILE).read_text().splitlines()]
    assert "model.safetensors" in listed and "config.json" in listed and SUMS_FILE not in listed
    assert verify_sums(export) == []
    if shutil.which("sha256sum"):  # the file is in sha256sum's own format
        subprocess.run(["sha256sum", "--quiet", "-c", SUMS_FILE], cwd=export, check=True)
    weights = export / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert verify_sums(export) == ["model.safetensors: sha256 mismatch"]


def test_every_checkpoint_corrupt_is_an_error_not_a_fresh_start(config):
    run_dir = Path(run_sft(config()).run_dir)
    for step in (2, 4):
        _flip_tensor_bytes(run_dir / "checkpoints" / f"step_{step}")
    with pytest.raises(CheckpointError, match="no intact checkpoint to resume from"):
        run_sft(config())


def test_keys_that_cannot_change_are_listed_before_the_model_loads(config, monkeypatch):
    run_sft(config())
    import posttrain.train.roles as roles

    monkeypatch.setattr(roles, "load_hf", lambda *a, **k: pytest.fail("the model must not load"))
    with pytest.raises(ConfigError) as err:
        run_sft(config("data.max_length=128", "train.weight_decay=0.1", "train.lr=2e-3"))
    message = str(err.value)
    with pytest.raises(ConfigError, match="train.micro_batch_size: 2 at step_4, now 1"):
        run_sft(config("train.micro_batch_size=1"))  # same world size: fewer rows per step
    assert "data.max_length: 256 at step_4, now 128" in message
    assert "train.weight_decay: 0.0 at step_4, now 0.1" in message
    assert "train.lr" not in message  # allowed


def test_extending_a_finished_run_continues_at_the_rescheduled_lr(config, logs):
    run_dir = Path(run_sft(config()).run_dir)
    assert _metrics(run_dir)[4]["lr"] > 0
    resumed = run_sft(config("train.steps=6"))
    assert resumed.steps == 6
    lrs = {step: m["lr"] for step, m in _metrics(run_dir).items()}
    for step in (5, 6):  # the saved cosine over 4 steps would give 0 here
        expected = 1e-3 * lr_factor(step - 1, warmup_steps=1, total_steps=6, schedule="cosine")
        assert expected > 0 and lrs[step] == pytest.approx(expected, rel=1e-9)
    assert any("config changed since step_4, applied: train.steps 4 -> 6" in r.getMessage() for r in logs.records)


def test_a_new_lr_and_schedule_apply_on_resume(config, logs):
    run_dir = Path(run_sft(config()).run_dir)
    run_sft(config("train.steps=6", "train.lr=5e-3", "train.schedule=constant"))
    lrs = {step: m["lr"] for step, m in _metrics(run_dir).items()}
    assert lrs[5] == lrs[6] == 5e-3
    diff = next(r.getMessage() for r in logs.records if "config changed" in r.getMessage())
    assert "train.lr 0.001 -> 0.005" in diff and "train.schedule 'cosine' -> 'constant'" in diff
    saved = (run_dir / "config.yaml").read_text()
    assert "lr: 0.005" in saved and "schedule: constant" in saved


def test_a_second_run_on_the_same_directory_is_refused(config, monkeypatch):
    import os

    import posttrain.train.roles as roles

    cfg = config()
    monkeypatch.setattr(roles, "load_hf", lambda *a, **k: pytest.fail("the model must not load"))
    with lock_run_dir(cfg.run_dir):  # a live run holds it
        with pytest.raises(RunDirLocked, match=f"in use by PID {os.getpid()} on host"):
            run_sft(cfg)
