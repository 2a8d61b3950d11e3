"""`EvalConfig`: held-out loss and an optional generation metric during training."""

from __future__ import annotations

import re

from pydantic import Field, field_validator, model_validator

from posttrain.config.base import FieldError, Section
from posttrain.config.data import SourceConfig


def check_scorer_name(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_.\-]+(:[A-Za-z_][A-Za-z0-9_]*)?", value):
        raise ValueError(f"expected a scorer name like 'gsm8k' or package.module:function, got {value!r}")
    return value


class EvalConfig(Section):
    sources: list[SourceConfig] = Field(default_factory=list)
    """Held-out datasets, rendered with the `data:` settings (template, masking, max_length)."""


    every_steps: int | None = Field(default=None, ge=1)
    """Evaluate every N optimiser steps; evaluation also runs at the end when data is given."""

    at_start: bool = False
    """Also evaluate before the first step (a baseline)."""

    max_samples: int | None = Field(default=None, ge=1)
    """Cap on held-out samples (loss and generation)."""

    scorer: str | None = None
    """Generation scorer: a name (e.g. `gsm8k`) or `package.module:function` taking
    `(response, reference) -> {metric: value}`; null scores held-out loss only."""

    max_new_tokens: int = Field(default=256, ge=1)

    repetition_penalty: float = Field(default=1.0, gt=0)
    """Greedy answers with this repetition penalty (1 = none; e.g. 1.1 breaks the loops small
    models fall into). Applied to the baseline and every later evaluation alike."""

    @field_validator("scorer")
    @classmethod
    def _check_scorer(cls, value: str | None) -> str | None:
        return None if value is None else check_scorer_name(value)

    @property
    def enabled(self) -> bool:
        return bool(self.sources)

    @model_validator(mode="after")
    def _check(self) -> EvalConfig:
        if not self.enabled:
            for name in ("every_steps", "scorer"):
                if getattr(self, name) is not None:
                    raise FieldError(name, "needs held-out data: set eval.sources")
            if self.at_start:
                raise FieldError("at_start", "needs held-out data: set eval.sources")
        return self
