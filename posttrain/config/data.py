"""The `data:` section of a recipe: where rows come from and how they become packed batches.

Consumed by `posttrain.data.build_loader`. Batch size, rank and world size are not here: the
trainer owns them and passes them to the loader.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Where a source column may be mapped (`SourceConfig.fields`): a chat role builds a one-turn
# conversation ordered system, user, assistant; the other names are the canonical row fields.
ROLE_TARGETS = ("system", "user", "assistant")
FIELD_TARGETS = ("messages", "prompt", "completion", "chosen", "rejected", "reference", "tools")


class SourceConfig(BaseModel):
    """One dataset: a file or a local Hugging Face `datasets` directory."""

    model_config = ConfigDict(extra="forbid")

    path: str
    # auto: from the suffix (.jsonl/.json/.parquet) or a directory written by `save_to_disk`.
    format: Literal["auto", "jsonl", "json", "parquet", "hf"] = "auto"
    # Split of a saved `DatasetDict` directory (default: "train" when there are several).
    split: str | None = None
    # Label used in counters and error messages (default: the file name).
    name: str | None = None
    # Relative sampling weight when several sources are mixed.
    weight: float = Field(1.0, gt=0)
    # Column -> target, e.g. {question: user, answer: assistant} for GSM8K SFT, or
    # {question: prompt, answer: reference} for RL prompts. Targets: a role in ROLE_TARGETS or a
    # canonical field in FIELD_TARGETS. Unmapped columns keep their names.
    fields: dict[str, str] = Field(default_factory=dict)
    # Prepended as a system message to conversations that have none.
    system_prompt: str | None = None
    # Raw dialogue text -> messages: role markers that open each turn, e.g. Anthropic HH-RLHF's
    # {"\n\nHuman:": user, "\n\nAssistant:": assistant}. Applied to text-valued messages, prompt,
    # chosen and rejected fields; text before the first marker is an error.
    dialogue: dict[str, str] | None = None
    # Only rows start <= i < stop (0-based, in file order; stop null: to the end), e.g. [0, 1500]
    # to train on the first 1,500 rows of a file and [1500, null] to hold the rest out.
    rows: tuple[int, int | None] | None = None

    @field_validator("fields")
    @classmethod
    def _check_fields(cls, fields: dict[str, str]) -> dict[str, str]:
        allowed = ROLE_TARGETS + FIELD_TARGETS
        for column, target in fields.items():
            if target not in allowed:
                raise ValueError(
                    f"fields.{column}: unknown target {target!r}; expected one of {', '.join(allowed)}"
                )
        roles = [t for t in fields.values() if t in ROLE_TARGETS]
        others = [t for t in fields.values() if t in FIELD_TARGETS and t != "tools"]
        if roles and others:
            raise ValueError(
                "fields: map columns either to roles (system/user/assistant) or to row fields "
                f"({', '.join(FIELD_TARGETS)}), not both"
            )
        return fields

    @field_validator("rows")
    @classmethod
    def _check_rows(cls, rows: tuple[int, int | None] | None) -> tuple[int, int | None] | None:
        if rows is not None:
            start, stop = rows
            if start < 0 or (stop is not None and stop <= start):
                raise ValueError(f"rows: expected [start, stop] with 0 <= start < stop, got {list(rows)}")
        return rows

    @field_validator("dialogue")
    @classmethod
    def _check_dialogue(cls, markers: dict[str, str] | None) -> dict[str, str] | None:
        if markers is None:
            return None
        if not markers:
            raise ValueError("dialogue: give at least one marker, e.g. {\"\\n\\nHuman:\": user}")
        for marker, role in markers.items():
            if not marker.strip():
                raise ValueError(f"dialogue: marker {marker!r} is blank")
            if role not in ROLE_TARGETS:
                raise ValueError(f"dialogue.{marker!r}: unknown role {role!r}; expected one of {', '.join(ROLE_TARGETS)}")
        return markers


class DataConfig(BaseModel):
    """How rows are read, rendered through the chat template, masked, packed and mixed."""

    model_config = ConfigDict(extra="forbid")

    sources: list[SourceConfig] = Field(min_length=1)
    # What a row becomes: one trained conversation (sft), a chosen/rejected pair (preference) or
    # an RL prompt with its reference answer (prompt: `posttrain grpo`).
    task: Literal["sft", "preference", "prompt"] = "sft"
    # Tokens per packed row (and the longest sample kept).
    max_length: int = Field(2048, ge=2)
    # false: one sample per row, padded to the longest row of the batch.
    packing: bool = True
    # Packing window in rows: samples gather until they fill this many rows, then are packed
    # best-fit-decreasing; the least-full quarter waits for the next round. Bounds the buffer.
    pack_rows: int = Field(64, ge=1)
    # Which assistant turns are trained; a message's own `train: false|true` wins.
    train_on: Literal["all", "last"] = "all"
    # Samples longer than max_length: drop them, or keep the first max_length tokens.
    overlong: Literal["drop", "truncate"] = "drop"
    # Content holding a special-token string (e.g. "<|im_end|>" in a user message): raise,
    # encode it as plain text (escape), or let it become the control token (allow).
    special_tokens: Literal["error", "escape", "allow"] = "error"
    # A template that rewrites earlier turns (e.g. drops earlier reasoning): raise, or expand the
    # conversation into one sample per trained assistant turn, each rendered as at inference.
    template_rewrite: Literal["error", "expand"] = "error"
    # false: rows with text prompt/completion are tokenized as plain text + EOS (base models).
    chat_template: bool = True
    # Malformed rows: raise (naming file, line and field) or skip, log (once each) and count.
    on_error: Literal["raise", "skip"] = "raise"
    # With on_error: skip, the run fails once more than this share of the rows read was skipped.
    max_skipped_fraction: float = Field(0.1, ge=0, le=1)
    shuffle: bool = True
    # Rows held by each source's shuffle buffer (streams are never loaded whole).
    shuffle_buffer: int = Field(10_000, ge=1)
    # Passes over the data; null streams forever (stop training by steps). With several sources
    # the run ends when the first source completes its last pass.
    epochs: int | None = Field(1, ge=1)
    # Data order seed; null uses the run seed given to the loader.
    seed: int | None = None
    # Batches prepared ahead by the background worker; 0 builds them in the training thread.
    prefetch: int = Field(2, ge=0)
    # rows: every rank renders and packs the whole stream and takes its own rows of each global
    # batch (equal batch counts by construction). samples: each rank renders only its share of
    # samples and packs it alone (cheaper at large world sizes; needs epochs: null).
    shard: Literal["rows", "samples"] = "rows"

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if self.shard == "samples" and self.epochs is not None:
            raise ValueError(
                "data.shard: samples gives ranks different batch counts at an epoch end; set "
                "data.epochs: null and stop training by steps, or use data.shard: rows"
            )
        names = [s.name for s in self.sources if s.name is not None]
        if len(names) != len(set(names)):
            raise ValueError(f"data.sources: duplicate source names {names}")
        return self
