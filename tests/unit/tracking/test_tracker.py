"""Tracker fan-out: console lines, metrics.jsonl (with resume), TensorBoard, rank 0 only,
optional MLflow / W&B (missing package errors, and the calls made, against stand-in modules)."""

from __future__ import annotations

import io
import json
import sys
import types
from pathlib import Path

import pytest
import torch
from rich.console import Console

from posttrain.config.tracking import TrackingConfig
from posttrain.tracking import MissingPackageError, Tracker, check_tracking_packages

FILES_ONLY = TrackingConfig(console=False, jsonl=True, tensorboard=False)


def plain_console() -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, force_terminal=False, width=200), buffer


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_fan_out_to_console_jsonl_and_tensorboard(tmp_path):
    console, buffer = plain_console()
    cfg = TrackingConfig()  # console, jsonl and tensorboard are on by default
    with Tracker(tmp_path, cfg, total_steps=4, console=console, hparams={"train": {"lr": 1e-3}}) as tracker:
        for step in (1, 2):
            tracker.log(step, {"loss": torch.tensor(2.0 / step), "lr": 1e-3, "tokens_per_s": 1234.5, "skip": None})
        tracker.log(2, {"eval/loss": 1.5})

    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 2]
    assert records[0]["loss"] == 2.0 and records[1]["loss"] == 1.0 and "skip" not in records[0]
    assert records[2]["eval/loss"] == 1.5 and "time" in records[2]

    text = buffer.getvalue()
    assert "step 1/4 | loss 2.0000 | lr 1.00e-03 | tok/s 1,234" in text
    assert "step 2: eval/loss 1.5000" in text
    assert "eta" in text

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 2.0), (2, 1.0)]
    assert [e.step for e in events.Scalars("eval/loss")] == [2]


def test_piped_console_prints_one_unwrapped_line_per_step_with_non_zero_counters_only(tmp_path):
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=False, width=80)  # what a pipe gets
    step = {"loss": 2.5, "lr": 1e-3, "grad_norm": 1.25, "tokens_per_s": 12345.0, "trained_tokens_per_s": 6789.0,
            "mfu": 0.123, "data/dropped": 0, "data/truncated": 0, "data/skipped_errors": 0}
    with Tracker(tmp_path, TrackingConfig(jsonl=False, tensorboard=False), total_steps=20,
                 console=console) as tracker:
        tracker.log(13, step)
        tracker.log(14, {**step, "data/skipped_errors": 2})
    lines = buffer.getvalue().splitlines()
    assert len(lines) == 2 and all(len(line) > 80 for line in lines)
    assert lines[0].startswith("step 13/20 | loss 2.5000") and "trained tok/s 6,789" in lines[0]
    assert "data/" not in lines[0]
    assert "| data/skipped_errors 2" in lines[1] and "data/dropped" not in lines[1]


def test_resume_drops_lines_after_the_checkpoint(tmp_path):
    with Tracker(tmp_path, FILES_ONLY) as tracker:
        for step in range(1, 6):
            tracker.log(step, {"loss": float(step)})
    with Tracker(tmp_path, FILES_ONLY, start_step=3) as tracker:  # resumed from step 3
        tracker.log(4, {"loss": 40.0})
    assert [(r["step"], r["loss"]) for r in read_jsonl(tmp_path / "metrics.jsonl")] == [
        (1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)
    ]
    with Tracker(tmp_path, FILES_ONLY) as tracker:  # a fresh run starts a fresh file
        tracker.log(1, {"loss": 9.0})
    assert len(read_jsonl(tmp_path / "metrics.jsonl")) == 1


def test_only_rank_zero_writes(tmp_path):
    with Tracker(tmp_path / "run", TrackingConfig(), rank=1) as tracker:
        assert not tracker.active
        tracker.log(1, {"loss": 1.0})
    assert not (tmp_path / "run").exists()


def test_terminal_progress_bar_runs(tmp_path):
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=160)
    with Tracker(tmp_path, TrackingConfig(jsonl=False, tensorboard=False), total_steps=3, console=console) as tracker:
        for step in (1, 2, 3):
            tracker.log(step, {"loss": 0.5, "mfu": 0.25})
    assert "loss 0.5000" in buffer.getvalue() and "25.0%" in buffer.getvalue()


def test_bad_metric_values(tmp_path):
    with Tracker(tmp_path, FILES_ONLY) as tracker:
        with pytest.raises(TypeError, match="'phase' must be a number"):
            tracker.log(1, {"phase": "eval"})
        with pytest.raises(TypeError, match="tensor of shape"):
            tracker.log(1, {"loss": torch.ones(2)})


@pytest.mark.parametrize("option, package", [({"mlflow": True}, "mlflow"), ({"wandb": "offline"}, "wandb")])
def test_missing_optional_package_is_named(tmp_path, monkeypatch, option, package):
    monkeypatch.setitem(sys.modules, package, None)  # import fails even where it is installed
    cfg = TrackingConfig(console=False, jsonl=False, tensorboard=False, **option)
    with pytest.raises(MissingPackageError, match=f"`{package}` package is not installed"):
        check_tracking_packages(cfg)
    with pytest.raises(MissingPackageError, match=f"tracking.{package} is enabled"):
        Tracker(tmp_path, cfg)
    assert issubclass(MissingPackageError, ValueError)  # the CLI reports it as a config error


class FakeMlflowClient:
    runs: dict[str, dict] = {}

    def __init__(self, tracking_uri: str):
        self.uri = tracking_uri

    def get_experiment_by_name(self, name):
        return None

    def create_experiment(self, name):
        return "exp-1"

    def create_run(self, experiment_id, run_name):
        run_id = f"run-{len(self.runs)}"
        self.runs[run_id] = {"name": run_name, "uri": self.uri, "params": {}, "metrics": [], "ended": False}
        return types.SimpleNamespace(info=types.SimpleNamespace(run_id=run_id))

    def log_batch(self, run_id, metrics=(), params=()):
        self.runs[run_id]["params"].update({p.key: p.value for p in params})
        self.runs[run_id]["metrics"].extend((m.key, m.value, m.step) for m in metrics)

    def set_terminated(self, run_id):
        self.runs[run_id]["ended"] = True


def test_mlflow_sink_calls(tmp_path, monkeypatch):
    mlflow = types.ModuleType("mlflow")
    entities = types.ModuleType("mlflow.entities")
    entities.Metric = lambda key, value, timestamp, step: types.SimpleNamespace(key=key, value=value, step=step)
    entities.Param = lambda key, value: types.SimpleNamespace(key=key, value=value)
    tracking = types.ModuleType("mlflow.tracking")
    tracking.MlflowClient = FakeMlflowClient
    for name, module in {"mlflow": mlflow, "mlflow.entities": entities, "mlflow.tracking": tracking}.items():
        monkeypatch.setitem(sys.modules, name, module)
    FakeMlflowClient.runs = {}
    cfg = TrackingConfig(console=False, jsonl=False, tensorboard=False, mlflow=True)
    with Tracker(tmp_path / "demo", cfg, hparams={"train": {"lr": 0.1}}) as tracker:
        tracker.log(1, {"loss": 3.0})
    with Tracker(tmp_path / "demo", cfg, start_step=1) as tracker:  # resumed: same MLflow run
        tracker.log(2, {"loss": 2.0})
    (run,) = FakeMlflowClient.runs.values()
    assert run["name"] == "demo" and run["uri"].startswith("file://") and run["uri"].endswith("demo/mlruns")
    assert run["params"] == {"train.lr": "0.1"}
    assert run["metrics"] == [("loss", 3.0, 1), ("loss", 2.0, 2)] and run["ended"]


def test_wandb_sink_calls(tmp_path, monkeypatch):
    calls: dict = {"init": [], "log": [], "finish": 0}

    class Run:
        def log(self, metrics, step):
            calls["log"].append((metrics, step))

        def finish(self):
            calls["finish"] += 1

    wandb = types.ModuleType("wandb")
    wandb.init = lambda **kwargs: calls["init"].append(kwargs) or Run()
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    cfg = TrackingConfig(console=False, jsonl=False, tensorboard=False, wandb="offline")
    for step in (1, 2):
        with Tracker(tmp_path, cfg, run_name="demo", hparams={"seed": 1}) as tracker:
            tracker.log(step, {"loss": 1.0})
    first, second = calls["init"]
    assert first["mode"] == "offline" and first["dir"] == str(tmp_path) and first["config"] == {"seed": 1}
    assert first["id"] == second["id"] and first["resume"] == "allow"
    assert calls["log"] == [({"loss": 1.0}, 1), ({"loss": 1.0}, 2)] and calls["finish"] == 2
