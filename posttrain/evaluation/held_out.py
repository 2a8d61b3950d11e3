"""Held-out objective metrics: the recipe's own objective on packed held-out batches."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from posttrain.config.data import DataConfig, SourceConfig
from posttrain.data.batch import PackedBatch
from posttrain.data.loader import build_loader
from posttrain.train.objective import Objective
from posttrain.train.step import evaluate_objective


def held_out_batches(
    data: DataConfig,
    sources: list[SourceConfig],
    tokenizer,
    *,
    batch_size: int,
    rank: int,
    world_size: int,
    max_samples: int | None,
) -> list[PackedBatch]:
    """Every held-out sample, rendered and packed like training data, one pass, in file order."""
    cfg = data.model_copy(update={"sources": sources, "shuffle": False, "epochs": 1, "prefetch": 0})
    batches = []
    with build_loader(cfg, tokenizer, batch_size=batch_size, rank=rank, world_size=world_size) as loader:
        for batch in loader:
            batches.append(batch)
            if max_samples is not None and loader.counters.samples >= max_samples:
                break
    return batches


class HeldOutEvaluator:
    """`loss` and the objective's metrics over held-out batches (all data-parallel ranks)."""

    def __init__(self, batches: list[PackedBatch], objective: Objective, *, precision: str,
                 device: torch.device, dp_group: dist.ProcessGroup | None):
        self.batches = [b.to(device) for b in batches]
        self.objective, self.precision, self.device, self.dp_group = objective, precision, device, dp_group

    def run(self, model: nn.Module, step: int) -> dict[str, float]:
        return evaluate_objective(model, self.batches, self.objective, precision=self.precision,
                                  device=self.device, dp_group=self.dp_group)
