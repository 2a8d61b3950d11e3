"""`TrackingConfig`: where per-step metrics go (rank 0 only)."""

from __future__ import annotations

from typing import Literal

from pydantic import field_validator

from posttrain.config.base import Section


class TrackingConfig(Section):
    console: bool = True
    """rich progress bar (step/total, ETA, loss, tokens/s); plain lines when not a terminal."""

    jsonl: bool = True
    """`metrics.jsonl` in the run directory."""

    tensorboard: bool = True
    """Event files in `<run_dir>/tb`."""

    mlflow: bool = False
    """Needs the `mlflow` package (`pip install posttrain[mlflow]`)."""

    mlflow_tracking_uri: str | None = None
    """Default: a local file store in `<run_dir>/mlruns`."""

    mlflow_experiment: str = "posttrain"
    wandb: Literal["off", "offline", "online"] = "off"
    """Needs the `wandb` package; `offline` writes to `<run_dir>/wandb` for a later `wandb sync`."""

    wandb_project: str = "posttrain"

    @field_validator("wandb", mode="before")
    @classmethod
    def _yaml_bool(cls, value: object) -> object:
        # YAML 1.1 reads a bare `off` as false and `on` as true.
        if value is False:
            return "off"
        if value is True:
            return "offline"
        return value
