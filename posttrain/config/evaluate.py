"""`EvaluateConfig`: `posttrain eval`, answers of one model to held-out prompts, scored."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator, model_validator

from posttrain.config.base import Section
from posttrain.config.data import SourceConfig
from posttrain.config.eval import check_scorer_name
from posttrain.config.model import ModelConfig
from posttrain.config.recipe import check_sources_exist


class EvaluateConfig(Section):
    name: str = Field("eval", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
    """The results go to `output_dir/name` (samples.jsonl, summary.json)."""

    output_dir: str = "runs"
    model: ModelConfig
    sources: list[SourceConfig] = Field(min_length=1)
    """Chat rows (messages, or fields mapped to user/assistant): the prompt is the conversation
    before its last assistant turn, the reference that turn."""

    scorer: str
    """A scorer name (`addition`, `gsm8k`) or `package.module:function` (response, reference) -> dict."""

    max_samples: int | None = Field(default=None, ge=1)
    max_new_tokens: int = Field(default=256, ge=1)
    repetition_penalty: float = Field(default=1.0, gt=0)
    temperature: float = Field(default=0.0, ge=0)
    """0: greedy; otherwise sampled with `seed` (one sample per prompt)."""

    seed: int = 0
    batch_size: int = Field(default=16, ge=1)

    @field_validator("scorer")
    @classmethod
    def _check_scorer(cls, value: str) -> str:
        return check_scorer_name(value)

    @model_validator(mode="after")
    def _check(self) -> EvaluateConfig:
        check_sources_exist(self.sources, "sources")
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name
