"""SIGTERM ends a run within seconds in every phase: set-up (counting the data), waiting for data,
evaluation, checkpointing and export. Each phase below receives the signal and then stalls for
minutes; the run must not wait for it."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch

import posttrain.train.trainer as trainer
from posttrain.config import SFTConfig, load_config
from posttrain.recipes.sft import SFTRecipe
from posttrain.train.trainer import train
from tests.integration.sft_configs import write_config

STALL_S = 300
LIMIT_S = 30  # generous for a slow CI machine; a run that waited for the stall takes 300 s


def _signal_and_stall() -> None:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(STALL_S)


class _StallingLoader:
    """Hands out batches, but on call number `at` the process is signalled and stalls."""

    def __init__(self, inner, at: int):
        self.inner, self.at, self.calls = inner, at, 0

    def __iter__(self):
        return self

    def __next__(self):
        self.calls += 1
        if self.calls == self.at:
            _signal_and_stall()
        return next(self.inner)

    def __getattr__(self, name):
        return getattr(self.inner, name)


class _StallingEvaluator:
    def run(self, model, step):
        _signal_and_stall()
        return {}


class _Phased(SFTRecipe):
    def __init__(self, cfg, phase: str):
        super().__init__(cfg)
        self.phase = phase

    def loader(self, ctx, *, counting: bool = False):
        inner = super().loader(ctx, counting=counting)
        if (self.phase, counting) in (("data", False), ("count", True)):
            return _StallingLoader(inner, at=4 if self.phase == "data" else 2)
        return inner

    def evaluators(self, ctx, objective):
        return [_StallingEvaluator()] if self.phase == "eval" else super().evaluators(ctx, objective)


@pytest.fixture
def run(tiny_checkpoints, task_dir, tmp_path):
    def start(phase: str, **sections):
        sections = {"train": {"steps": 8}, "checkpoint": {"resume": "auto"}, **sections}
        path = write_config(tmp_path / "cfg.yaml", tiny_checkpoints["llama"], task_dir, tmp_path, **sections)
        started = time.monotonic()
        result = train(_Phased(load_config(path, [], SFTConfig), phase))
        assert time.monotonic() - started < LIMIT_S
        assert result.status == "stopped"
        return result, tmp_path / "run" / "checkpoints"
    return start


def test_stop_while_waiting_for_data_saves_the_last_finished_step(run):
    """The 4th micro-batch is the second of step 2 (2 per step): the first one is given back."""
    result, checkpoints = run("data")
    assert result.steps == 1 and result.export_dir is None
    state = torch.load(checkpoints / "step_1" / "rank_0.pt", weights_only=True)
    assert state["loader"]["counters"]["rows"] == 4  # step 1's 2 x 2 rows, not the 6 handed out


def test_stop_while_counting_the_data_ends_before_training(run):
    result, checkpoints = run("count", train={"steps": None}, data={"epochs": 1})
    assert result.steps == 0 and not checkpoints.exists()


def test_stop_during_evaluation(run, task_dir):
    held_out = {"sources": [{"path": str(task_dir / "held_out.jsonl"),
                             "fields": {"question": "user", "answer": "assistant"}}], "every_steps": 2}
    result, checkpoints = run("eval", eval=held_out)
    assert result.steps == 2 and (checkpoints / "step_2" / "meta.json").exists()


def test_stop_during_export(run, monkeypatch):
    monkeypatch.setattr(trainer, "export_run", lambda *a, **k: _signal_and_stall())
    result, checkpoints = run("export")
    assert result.steps == 8 and (checkpoints / "step_8" / "meta.json").exists()
    assert not (checkpoints.parent / "export").exists()


def test_stop_during_a_checkpoint_save_finishes_it_then_ends(run, monkeypatch):
    real_save = trainer.save_checkpoint

    def signalled_save(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives in the middle of the save
        return real_save(*args, **kwargs)

    monkeypatch.setattr(trainer, "save_checkpoint", signalled_save)
    result, checkpoints = run("checkpoint", checkpoint={"resume": "auto", "every_steps": 3})
    assert result.steps == 3
    assert json.loads((checkpoints / "step_3" / "meta.json").read_text())["step"] == 3
    assert sorted(p.name for p in checkpoints.iterdir() if p.is_dir()) == ["step_3"]
    assert Path(checkpoints / "latest").read_text().strip() == "step_3"
