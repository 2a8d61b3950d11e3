"""`ModelSpec`: what a family contributes — config mapping both ways and the state-dict key map."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from posttrain.models.common.config import ModelArgs
from posttrain.models.common.key_map import KeyMap


@dataclass(frozen=True)
class ModelSpec:
    """One model family.

    `args_from_hf(config_dict)` reads an HF `config.json` dict; `args_to_hf(args, model_type)`
    returns the config fields that describe `args` (merged over the source config on export).
    `architectures` gives the transformers class name written for each accepted `model_type`.
    """

    family: str
    architectures: dict[str, str]  # model_type -> transformers class name
    args_from_hf: Callable[[dict[str, Any]], ModelArgs]
    args_to_hf: Callable[[ModelArgs, str], dict[str, Any]]
    key_map: KeyMap

    @property
    def model_types(self) -> tuple[str, ...]:
        return tuple(self.architectures)
