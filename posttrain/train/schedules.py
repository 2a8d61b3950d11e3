"""Learning-rate schedules: linear warmup, then cosine / linear decay or a constant rate.

Step `s` counts optimiser steps from 0 (the first `optimizer.step()` uses `s = 0`; call
`scheduler.step()` after each optimiser step). With `W` warmup steps and `T` total steps:

    s < W:   factor = (s + 1) / W                      # reaches 1 on the last warmup step
    s >= W:  p = min(1, (s - W) / (T - W))             # 0 on the first decay step
             cosine:   min + (1 - min) * (1 + cos(pi * p)) / 2
             linear:   min + (1 - min) * (1 - p)
             constant: 1

where `min` is `min_lr_ratio`. The first decay step runs at the peak rate; steps past `T` stay
at `min`. The rate of each param group is its initial `lr` times `factor`.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch.optim.lr_scheduler import LRScheduler

from posttrain.config.train import TrainConfig

Schedule = Literal["cosine", "linear", "constant"]


def lr_factor(
    step: int,
    *,
    warmup_steps: int,
    total_steps: int,
    schedule: Schedule,
    min_lr_ratio: float = 0.0,
) -> float:
    """Multiplier on the peak learning rate at optimiser step `step` (0-based)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    decay_steps = total_steps - warmup_steps
    progress = 1.0 if decay_steps <= 0 else min(1.0, (step - warmup_steps) / decay_steps)
    if schedule == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif schedule == "linear":
        shape = 1.0 - progress
    else:
        raise ValueError(f"unknown schedule {schedule!r}; expected cosine, linear or constant")
    return min_lr_ratio + (1.0 - min_lr_ratio) * shape


class WarmupDecayLR(LRScheduler):
    """`lr_factor` as a torch `LRScheduler` (its `state_dict` holds the step and the settings)."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        warmup_steps: int,
        total_steps: int,
        schedule: Schedule = "cosine",
        min_lr_ratio: float = 0.0,
        last_epoch: int = -1,
    ):
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        if not 0 <= warmup_steps <= total_steps:
            raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}")
        if schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"unknown schedule {schedule!r}; expected cosine, linear or constant")
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.schedule: Schedule = schedule
        self.min_lr_ratio = min_lr_ratio
        super().__init__(optimizer, last_epoch)

    def factor(self, step: int) -> float:
        return lr_factor(
            step,
            warmup_steps=self.warmup_steps,
            total_steps=self.total_steps,
            schedule=self.schedule,
            min_lr_ratio=self.min_lr_ratio,
        )

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore the position only. The settings and base rates stay as this scheduler was
        built (from the current config), and the optimiser's rates are recomputed for the step,
        so a resumed run follows its current schedule; with an unchanged config the rates are the
        saved ones bit for bit. Call after loading the optimiser's state."""
        self.last_epoch = int(state_dict["last_epoch"])
        self._step_count = int(state_dict.get("_step_count", self.last_epoch + 1))
        lrs = self.get_lr()
        for group, lr, base in zip(self.optimizer.param_groups, lrs, self.base_lrs):
            group["lr"] = lr
            group["initial_lr"] = base
        self._last_lr = lrs

    def get_lr(self) -> list[float]:
        # `last_epoch` is the number of `step()` calls so far: the index of the next optimiser step.
        factor = self.factor(self.last_epoch)
        return [base * factor for base in self.base_lrs]


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int
) -> WarmupDecayLR:
    """The schedule of `cfg` (warmup_steps, schedule, min_lr_ratio) over `total_steps` steps."""
    if cfg.warmup_steps > total_steps:
        raise ValueError(
            f"train.warmup_steps ({cfg.warmup_steps}) exceeds the run's {total_steps} optimiser steps"
        )
    return WarmupDecayLR(
        optimizer,
        warmup_steps=cfg.warmup_steps,
        total_steps=total_steps,
        schedule=cfg.schedule,
        min_lr_ratio=cfg.min_lr_ratio,
    )
