"""`PipelineConfig`: `posttrain pipeline CONFIG`, an ordered list of recipe stages in one run directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from posttrain.config.base import FieldError, Section

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_\-]*$"


class StageConfig(Section):
    name: str = Field(pattern=NAME_PATTERN)
    """The stage's folder under the pipeline's run directory; later stages refer to its exported
    model as `${stages.<name>.export}`."""

    recipe: Literal["sft", "dpo", "distill", "grpo", "eval"]
    config: str | dict[str, Any]
    """The stage's recipe config: a YAML file (relative to the pipeline file) or the mapping inline.
    Its `output_dir` and `name` are set by the pipeline; training stages resume automatically."""

    overrides: list[str] = Field(default_factory=list)
    """Dotted `key=value` overrides applied to the stage's config."""


class PipelineConfig(Section):
    name: str = Field(pattern=NAME_PATTERN)
    output_dir: str = "runs"
    """The pipeline's run directory is `output_dir/name`: a folder per stage and `pipeline.json`."""

    stages: list[StageConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _check(self) -> PipelineConfig:
        names = [s.name for s in self.stages]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise FieldError("stages", f"stage names repeat: {', '.join(repeated)}")
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name
