"""`ModelConfig`: which checkpoint to load and how to run it."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import field_validator

from posttrain.config.base import Section


def bundled_model_names() -> list[str]:
    from posttrain.models.hub import BUNDLED

    return sorted(BUNDLED)


def check_model_path(value: str) -> str:
    """A bundled model name, or a directory holding a config.json."""
    if value in bundled_model_names():
        return value
    directory = Path(value).expanduser()
    if not directory.is_dir():
        raise ValueError(
            f"{value!r} is neither an existing directory nor a bundled model name "
            f"(bundled: {', '.join(bundled_model_names())})"
        )
    if not (directory / "config.json").is_file():
        raise ValueError(f"{value!r} has no config.json; expected a Hugging Face model directory")
    return value


class ModelConfig(Section):
    path: str
    """A Hugging Face directory (config.json + *.safetensors) or a bundled model name."""

    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Weight dtype; `auto` follows `train.precision` (float32 for both precisions)."""

    attention: Literal["sdpa", "flex", "flash_varlen"] = "sdpa"
    activation_checkpointing: bool = False
    """Recompute each transformer block in backward instead of keeping its activations."""

    compile: bool = False
    """`torch.compile` each transformer block."""

    trust_remote_code: bool = False

    @field_validator("path")
    @classmethod
    def _check_path(cls, value: str) -> str:
        return check_model_path(value)

    @property
    def is_bundled(self) -> bool:
        """True when `path` names a bundled model (import it with `posttrain.models.hub`)."""
        return self.path in bundled_model_names()


class FrozenModelConfig(Section):
    """A model that is run but never trained: a DPO/RL reference or a distillation teacher.

    It is loaded in its own dtype, in eval mode, without gradients, activation checkpointing or
    compile. With `path: null` it is the policy's own checkpoint; under LoRA that is the policy
    itself with its adapters switched off (no second copy).
    """

    path: str | None = None
    """A Hugging Face directory or bundled model name; null: the policy's `model.path`."""

    dtype: Literal["float32", "bfloat16"] = "float32"
    attention: Literal["sdpa", "flex", "flash_varlen"] = "sdpa"
    shard: bool = True
    """On a device mesh, shard it like the policy (FSDP2/TP); false keeps a whole copy per rank."""

    trust_remote_code: bool = False

    @field_validator("path")
    @classmethod
    def _check_path(cls, value: str | None) -> str | None:
        return None if value is None else check_model_path(value)
