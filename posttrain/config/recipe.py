"""`RecipeConfig`: the sections every training recipe has, one per component.

Each recipe's config (`SFTConfig`, and later DPO, distillation, GRPO) derives from it and adds its
own sections; the trainer (`train/trainer.py`) reads only what is declared here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

from pydantic import Field, model_validator

from posttrain.config.base import FieldError, Section
from posttrain.config.checkpoint import CheckpointConfig
from posttrain.config.data import DataConfig, SourceConfig
from posttrain.config.eval import EvalConfig
from posttrain.config.launcher import LauncherConfig
from posttrain.config.lora import LoraConfig
from posttrain.config.model import ModelConfig
from posttrain.config.parallel import ParallelConfig
from posttrain.config.tracking import TrackingConfig
from posttrain.config.train import TrainConfig

# Weight dtype each precision trains with (`model.dtype: auto` resolves to it).
PRECISION_DTYPE = {"fp32": "float32", "bf16_autocast": "float32"}


def check_sources_exist(sources: list[SourceConfig], path: str) -> None:
    """Fail on the first source whose file or directory is missing (`path` names the list)."""
    for i, source in enumerate(sources):
        if not Path(source.path).expanduser().exists():
            raise FieldError(f"{path}.{i}.path", f"no such file or directory: {source.path!r}")


def model_position_limit(path: str | None) -> int | None:
    """`max_position_embeddings` from the model's config.json, when the file is at hand.

    Reads only the JSON (no weights). A bundled model that is not imported yet, or a model
    without a path (a distillation student made from its teacher), gives None.
    """
    if path is None:
        return None
    from posttrain.models.hub import BUNDLED, default_model_dir

    config_file = (default_model_dir(path) if path in BUNDLED else Path(path).expanduser()) / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError):
        return None
    for section in (config, config.get("text_config") or {}):
        limit = section.get("max_position_embeddings")
        if isinstance(limit, int) and limit > 0:
            return limit
    return None


def check_position_limit(path: str | None, max_length: int) -> None:
    """`data.max_length` must fit the model at `path` (when its config.json is at hand)."""
    limit = model_position_limit(path)
    if limit is not None and max_length > limit:
        raise FieldError("data.max_length", f"{max_length} is over the model's limit of {limit} positions "
                         f"(max_position_embeddings in {path}/config.json)")


class RecipeConfig(Section):
    RESUME_MUTABLE: ClassVar[tuple[str, ...]] = (
        "name", "output_dir",
        "train.steps", "train.lr", "train.schedule", "train.warmup_steps", "train.min_lr_ratio",
        "train.grad_clip", "train.log_every", "train.chunk_size", "train.vocab_chunk_size",
        "model.attention", "model.activation_checkpointing", "model.compile",
        "data.prefetch", "data.max_skipped_fraction",
        "eval", "tracking", "checkpoint", "launcher", "parallel",
    )
    """Dotted keys (or sections) a resumed run may change; every other change is refused
    (`train/resume.py`). A recipe's config extends it with its own (`RecipeConfig.RESUME_MUTABLE
    + (...)`)."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
    """Run name; the run directory is `output_dir/name`."""

    output_dir: str = "runs"
    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    lora: LoraConfig = Field(default_factory=LoraConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    launcher: LauncherConfig = Field(default_factory=LauncherConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    @model_validator(mode="after")
    def _check(self) -> RecipeConfig:
        precision = self.train.precision
        wanted = PRECISION_DTYPE[precision]
        if self.model.dtype == "auto":
            self.model.dtype = wanted  # type: ignore[assignment]  # saved resolved
        elif self.model.dtype != wanted:
            raise FieldError(
                "model.dtype",
                f"{self.model.dtype} weights do not go with train.precision: {precision} "
                f"(which trains {wanted} weights); set model.dtype: auto or change the precision",
            )
        if self.train.steps is None and self.data.epochs is None:
            raise FieldError(
                "train.steps",
                "null (train until the data ends) needs data.epochs; with data.epochs: null the "
                "data never ends, so set train.steps",
            )
        check_position_limit(self.model.path, self.data.max_length)
        check_sources_exist(self.data.sources, "data.sources")
        check_sources_exist(self.eval.sources, "eval.sources")
        return self


class SFTConfig(RecipeConfig):
    """Supervised fine-tuning: the common sections; the objective is next-token cross-entropy."""

    @model_validator(mode="after")
    def _check_task(self) -> SFTConfig:
        if self.data.task == "prompt":
            raise FieldError("data.task", "prompt rows carry no answer to train on; supervised fine-tuning "
                             "reads conversations (sft); prompts are for posttrain grpo")
        return self
