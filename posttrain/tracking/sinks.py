"""Metric sinks beside the console: metrics.jsonl, TensorBoard, MLflow (local store), W&B.

Each sink has `log(step, metrics)` and `close()`. MLflow and W&B are optional packages,
imported only when enabled.
"""

from __future__ import annotations

import importlib
import json
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from posttrain.config.tracking import TrackingConfig


class Sink(Protocol):
    def log(self, step: int, metrics: Mapping[str, float]) -> None: ...

    def close(self) -> None: ...


class MissingPackageError(ImportError, ValueError):
    """An enabled tracking backend whose package is not installed (a config mistake)."""


def require(package: str, option: str, install: str) -> Any:
    """Import `package` or say which option needs it and how to install it."""
    try:
        return importlib.import_module(package)
    except ImportError:
        raise MissingPackageError(
            f"{option} is enabled but the `{package}` package is not installed; "
            f"run `{install}` or turn {option} off",
            name=package,
        ) from None


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1}} -> {"train.lr": 1}."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


class JsonlSink:
    """One JSON object per call in `path`: `{"step": ..., "time": ..., **metrics}`.

    The file holds one trajectory: opening it for a run resumed at `start_step` drops lines with
    a later step (left by the interrupted run); a run starting at step 0 starts a new file.
    Non-finite values are written as `NaN` / `Infinity` (Python's json reads them back).
    """

    def __init__(self, path: str | Path, start_step: int = 0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept: list[str] = []
        if start_step > 0 and self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= start_step:
                        kept.append(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a crash
        self.path.write_text("".join(f"{line}\n" for line in kept))
        self._file = open(self.path, "a", buffering=1)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        record = {"step": step, "time": round(time.time(), 3), **metrics}
        self._file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self._file.close()


class TensorBoardSink:
    """Scalars under `log_dir`; on resume, events after `start_step` are purged."""

    def __init__(self, log_dir: str | Path, start_step: int = 0, config_text: str | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(
            log_dir=str(log_dir),
            purge_step=start_step + 1 if start_step > 0 else None,
            flush_secs=10,
        )
        if config_text is not None and start_step == 0:
            self.writer.add_text("config", f"```yaml\n{config_text}\n```", 0)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


def _persistent_id(path: Path, make: Any) -> tuple[str, bool]:
    """(id, is_new): the id stored in `path`, or a new one written there."""
    if path.is_file():
        return path.read_text().strip(), False
    new_id = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new_id + "\n")
    return new_id, True


class MlflowSink:
    """An MLflow run, by default in a local file store at `<run_dir>/mlruns`.

    The MLflow run id is kept in `<run_dir>/mlflow_run_id`, so a resumed run logs to the same
    MLflow run. Parameters (the flattened config) are logged when the MLflow run is created.
    """

    def __init__(
        self,
        run_dir: Path,
        cfg: TrackingConfig,
        run_name: str,
        hparams: Mapping[str, Any] | None = None,
    ):
        require("mlflow", "tracking.mlflow", "pip install 'posttrain[mlflow]'")
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient

        self._metric = Metric
        uri = cfg.mlflow_tracking_uri or (run_dir / "mlruns").resolve().as_uri()
        self.client = MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name(cfg.mlflow_experiment)
        experiment_id = (
            experiment.experiment_id
            if experiment is not None
            else self.client.create_experiment(cfg.mlflow_experiment)
        )
        id_file = run_dir / "mlflow_run_id"
        if id_file.is_file():
            self.run_id = id_file.read_text().strip()
        else:
            run = self.client.create_run(experiment_id, run_name=run_name)
            self.run_id = run.info.run_id
            id_file.write_text(self.run_id + "\n")
            params = [Param(k, str(v)[:6000]) for k, v in flatten(hparams or {}).items()]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
                self.client.log_batch(self.run_id, params=params[i : i + 100])

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        now = int(time.time() * 1000)
        batch = [self._metric(key, float(value), now, step) for key, value in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class WandbSink:
    """A W&B run under `<run_dir>/wandb` (`offline` by default: sync later with `wandb sync`).

    The run id is kept in `<run_dir>/wandb_run_id` so a resumed run continues the same W&B run.
    """

    def __init__(
        self,
        run_dir: Path,
        cfg: TrackingConfig,
        run_name: str,
        hparams: Mapping[str, Any] | None = None,
    ):
        wandb = require("wandb", "tracking.wandb", "pip install wandb")
        run_id, _ = _persistent_id(run_dir / "wandb_run_id", lambda: uuid.uuid4().hex[:12])
        self.run = wandb.init(
            project=cfg.wandb_project,
            name=run_name,
            id=run_id,
            resume="allow",
            dir=str(run_dir),
            mode=cfg.wandb,
            config=dict(hparams or {}),
        )

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        self.run.log(dict(metrics), step=step)

    def close(self) -> None:
        self.run.finish()
