"""Recipe configuration: one small pydantic model per component, loaded from YAML.

`load_config(path, overrides, SFTConfig)` reads a YAML file, applies dotted `key=value`
overrides and validates; every error names the key path, the bad value, what is allowed and the
file (with its line) or the override it came from.
"""

from posttrain.config.base import FieldError, Section
from posttrain.config.checkpoint import CheckpointConfig
from posttrain.config.data import DataConfig, SourceConfig
from posttrain.config.eval import EvalConfig
from posttrain.config.launcher import LauncherConfig
from posttrain.config.loading import (
    ConfigError,
    apply_overrides,
    config_hash,
    load_config,
    parse_override,
    save_resolved,
    to_yaml,
)
from posttrain.config.lora import LoraConfig
from posttrain.config.model import FrozenModelConfig, ModelConfig
from posttrain.config.recipe import RecipeConfig, SFTConfig
from posttrain.config.tracking import TrackingConfig
from posttrain.config.train import TrainConfig

__all__ = [
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "FieldError",
    "LauncherConfig",
    "LoraConfig",
    "FrozenModelConfig",
    "ModelConfig",
    "RecipeConfig",
    "SFTConfig",
    "Section",
    "SourceConfig",
    "TrackingConfig",
    "TrainConfig",
    "apply_overrides",
    "config_hash",
    "load_config",
    "parse_override",
    "save_resolved",
    "to_yaml",
]
