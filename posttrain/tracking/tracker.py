"""`Tracker`: one `log(step, metrics)` call fanned out to every enabled sink, on rank 0 only.

Metrics are plain numbers already reduced over ranks by the caller. Names follow one scheme
across recipes: per-step `loss`, `grad_norm`, `lr`, `tokens_per_s`, `trained_tokens_per_s`,
`mfu`, `peak_mem_gib`, `packing_efficiency`, ...; evaluation and other periodic groups use a
prefix with a slash (`eval/loss`, `eval/gsm8k_accuracy`).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml
from rich.console import Console

from posttrain.config.tracking import TrackingConfig
from posttrain.tracking.console import ConsoleSink
from posttrain.tracking.sinks import (
    JsonlSink,
    MissingPackageError,
    MlflowSink,
    Sink,
    TensorBoardSink,
    WandbSink,
)

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tb"


def check_tracking_packages(cfg: TrackingConfig) -> None:
    """Fail early (before a model loads) when an enabled backend's package is missing."""
    needed = [("mlflow", "tracking.mlflow", "pip install 'posttrain[mlflow]'")] if cfg.mlflow else []
    if cfg.wandb != "off":
        needed.append(("wandb", "tracking.wandb", "pip install wandb"))
    for package, option, install in needed:
        if importlib.util.find_spec(package) is None:
            raise MissingPackageError(
                f"{option} is enabled but the `{package}` package is not installed; "
                f"run `{install}` or turn {option} off",
                name=package,
            )


def _current_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _as_number(key: str, value: Any) -> float | int | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise TypeError(f"metric {key!r} is a tensor of shape {tuple(value.shape)}; log a scalar")
        value = value.item()
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)):
        return value
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    raise TypeError(f"metric {key!r} must be a number, got {type(value).__name__}")


class Tracker:
    """Writes metrics of one run to the console, `metrics.jsonl`, TensorBoard, MLflow and W&B.

    Args:
        run_dir: the run directory (`metrics.jsonl`, `tb/`, `mlruns/`, `wandb/` go there).
        cfg: which sinks are on.
        total_steps: for the progress bar and ETA (None when unknown).
        start_step: the step a resumed run continues from: file sinks drop what an interrupted
            run logged after it, and the ETA counts from it.
        run_name: name shown by MLflow / W&B (default: the run directory's name).
        hparams: the resolved config (nested dict) for MLflow params, W&B config and TensorBoard.
        rank: defaults to the process-group rank; only rank 0 writes anything.
        console: rich console for the progress output (tests pass one writing to a buffer).
    """

    def __init__(
        self,
        run_dir: str | Path,
        cfg: TrackingConfig,
        *,
        total_steps: int | None = None,
        start_step: int = 0,
        run_name: str | None = None,
        hparams: Mapping[str, Any] | None = None,
        rank: int | None = None,
        console: Console | None = None,
    ):
        self.run_dir = Path(run_dir)
        self.rank = _current_rank() if rank is None else rank
        self.sinks: list[Sink] = []
        if self.rank != 0:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        name = run_name or self.run_dir.name
        config_text = yaml.safe_dump(dict(hparams), sort_keys=False) if hparams else None
        try:
            if cfg.console:
                self.sinks.append(ConsoleSink(total_steps, start_step, console=console))
            if cfg.jsonl:
                self.sinks.append(JsonlSink(self.run_dir / METRICS_FILE, start_step))
            if cfg.tensorboard:
                self.sinks.append(
                    TensorBoardSink(self.run_dir / TENSORBOARD_DIR, start_step, config_text)
                )
            if cfg.mlflow:
                self.sinks.append(MlflowSink(self.run_dir, cfg, name, hparams))
            if cfg.wandb != "off":
                self.sinks.append(WandbSink(self.run_dir, cfg, name, hparams))
        except BaseException:
            self.close()
            raise

    @property
    def active(self) -> bool:
        return bool(self.sinks)

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Record `metrics` at optimiser step `step` (tensors and numpy scalars are converted;
        None values are skipped). A no-op off rank 0."""
        if not self.sinks:
            return
        clean: dict[str, float | int] = {}
        for key, value in metrics.items():
            number = _as_number(key, value)
            if number is not None:
                clean[key] = number
        if not clean:
            return
        for sink in self.sinks:
            sink.log(step, clean)

    def close(self) -> None:
        sinks, self.sinks = self.sinks, []
        for sink in reversed(sinks):
            sink.close()

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
