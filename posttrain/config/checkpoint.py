"""`CheckpointConfig`: when to save, how many to keep, and where to resume from."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from posttrain.config.base import Section


class CheckpointConfig(Section):
    every_steps: int | None = Field(default=None, ge=1)
    """Save every N optimiser steps; null saves only at the end (and on SIGTERM/SIGINT)."""

    keep_last: int | None = Field(default=2, ge=1)
    """Complete checkpoints kept (older ones are deleted); null keeps all."""

    save_at_end: bool = True
    resume: str = "auto"
    """`auto` (newest complete checkpoint of this run, if any), `never`, or a path to a
    checkpoint directory (`.../checkpoints/step_N`) or to a run directory."""

    on_corrupt: Literal["fallback", "raise"] = "fallback"
    """A checkpoint whose files fail their checksums (or cannot be read) on resume: `fallback`
    warns and resumes from the previous intact one; `raise` stops and names the intact one."""

    @field_validator("resume")
    @classmethod
    def _check_resume(cls, value: str) -> str:
        if value in ("auto", "never"):
            return value
        if not Path(value).expanduser().exists():
            raise ValueError(f"expected 'auto', 'never' or an existing path; {value!r} does not exist")
        return value
