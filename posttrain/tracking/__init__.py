"""Experiment tracking: rich console progress, metrics.jsonl, TensorBoard, MLflow, W&B."""

from posttrain.tracking.sinks import MissingPackageError
from posttrain.tracking.tracker import METRICS_FILE, TENSORBOARD_DIR, Tracker, check_tracking_packages

__all__ = ["METRICS_FILE", "TENSORBOARD_DIR", "MissingPackageError", "Tracker", "check_tracking_packages"]
