"""`TrainConfig`: length of training, batch shape, optimiser, schedule and precision."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, model_validator

from posttrain.config.base import FieldError, Section
from posttrain.ops.inputs import DEFAULT_CHUNK_SIZE, DEFAULT_VOCAB_CHUNK_SIZE


class TrainConfig(Section):
    steps: int | None = Field(default=None, ge=1)
    """Optimiser steps to run; null trains until the data ends (`data.epochs` passes)."""

    # Batch shape. A row holds `data.max_length` packed tokens.
    micro_batch_size: int = Field(default=1, ge=1)
    """Rows per forward/backward on each rank."""

    grad_accum: int | None = Field(default=None, ge=1)
    """Micro-batches per optimiser step on each rank. Default 1; excludes `tokens_per_step`."""

    tokens_per_step: int | None = Field(default=None, ge=1)
    """Tokens per optimiser step over all ranks; sets the accumulation from the world size."""

    # Optimiser (AdamW).
    lr: float = Field(default=2e-5, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    decay_embeddings: bool = False
    """Apply weight decay to embedding tables too (1-D params, norms and biases never decay)."""

    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(default=1e-8, gt=0)
    grad_clip: float | None = Field(default=1.0, gt=0)
    """Clip the global gradient norm to this; null disables clipping."""

    # Schedule.
    warmup_steps: int = Field(default=0, ge=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = Field(default=0.0, ge=0, le=1)
    """The schedule decays to `lr * min_lr_ratio` (cosine and linear)."""

    precision: Literal["fp32", "bf16_autocast"] = "fp32"
    """`fp32`, or `bf16_autocast` (fp32 weights and optimiser state, bf16 matmuls)."""

    chunk_size: int = Field(default=DEFAULT_CHUNK_SIZE, ge=1)
    """Tokens per tile of the chunked LM-head ops (loss, log-probs, KL): memory, not results."""

    vocab_chunk_size: int = Field(default=DEFAULT_VOCAB_CHUNK_SIZE, ge=1)
    """Vocabulary rows per tile of the chunked LM-head ops."""

    seed: int = 0
    log_every: int = Field(default=1, ge=1)

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.grad_accum is not None and self.tokens_per_step is not None:
            raise FieldError(
                "grad_accum",
                f"set train.grad_accum ({self.grad_accum}) or train.tokens_per_step "
                f"({self.tokens_per_step}), not both",
            )
        if self.steps is not None and self.warmup_steps > self.steps:
            raise FieldError(
                "warmup_steps", f"must be <= train.steps ({self.steps}), got {self.warmup_steps}"
            )
        for i, beta in enumerate(self.betas):
            if not 0.0 <= beta < 1.0:
                raise FieldError(f"betas.{i}", f"must be in [0, 1), got {beta}")
        return self

    def grad_accum_steps(self, max_length: int, world_size: int = 1) -> int:
        """Micro-batches per optimiser step on each rank.

        `grad_accum` (default 1), or with `tokens_per_step` the nearest whole number of
        micro-batches, at least one: `round(tokens_per_step / (micro_batch_size * max_length *
        world_size))`. `max_length` is the packed row length (`data.max_length`).
        """
        if world_size < 1 or max_length < 1:
            raise ValueError(f"need world_size >= 1 and max_length >= 1, got {world_size}, {max_length}")
        if self.tokens_per_step is None:
            return self.grad_accum or 1
        per_micro_round = self.micro_batch_size * max_length * world_size
        return max(1, math.floor(self.tokens_per_step / per_micro_round + 0.5))
