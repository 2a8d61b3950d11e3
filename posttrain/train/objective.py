"""The objective protocol: what a recipe gives the trainer instead of a loop of its own.

An objective turns one micro-batch into its share of the step's loss and into metric sums:

    out = objective.compute(model, batch, normaliser)   # ObjectiveOutput(loss, metrics)

`normaliser` is the *global* count of the units the objective averages over (`tokens`: trained
tokens, `sequences`: documents, `pairs`: document pairs), summed over every micro-batch of the
step and every data-parallel rank; `loss` is this micro-batch's sum divided by it, so the shares
add up to the global mean however the batch was split. An objective with a second denominator
(DPO's optional SFT term is a mean over chosen tokens) names it in `extra_counts(batch)`; the
global sums arrive as `normaliser.counts[name]` (`Normaliser` is an `int` that carries them). `metrics` maps a name to `(sum, count)`
on this micro-batch; the step engine sums both over micro-batches and ranks and reports
`sum / count`, a global mean whose denominator each metric chooses for itself. `maxima` maps a
name to a value reported as its maximum over micro-batches and ranks.

`prepare(batch)` runs before the step's first forward, without gradients: the place for a
reference or teacher pass that writes per-token fields (`batch.with_fields(...)`). The fields an
objective reads are declared in `required_fields` / `optional_fields`; a batch lacking a required
one, or carrying one the objective does not declare, is refused (`check_fields`), so a field
produced upstream can never be silently ignored.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn as nn

Normaliser = Literal["tokens", "sequences", "pairs"]
NORMALISERS: tuple[str, ...] = ("tokens", "sequences", "pairs")
MetricValue = tuple[torch.Tensor | float, torch.Tensor | float]  # (sum, count)


class Normaliser(int):
    """The global count of an objective's unit, carrying its extra global counts in `counts`."""

    counts: dict[str, int]

    def __new__(cls, units: int, counts: Mapping[str, int] | None = None) -> Normaliser:
        value = super().__new__(cls, units)
        value.counts = dict(counts or {})
        return value


@dataclass
class ObjectiveOutput:
    loss: torch.Tensor  # scalar: this micro-batch's share of the global mean
    metrics: dict[str, MetricValue] = field(default_factory=dict)
    maxima: dict[str, torch.Tensor | float] = field(default_factory=dict)  # reported as the global max


class Objective:
    """Base class with the defaults; subclasses set the class attributes and `compute`."""

    name: str = "objective"
    normaliser: Normaliser = "tokens"
    required_fields: frozenset[str] = frozenset()
    optional_fields: frozenset[str] = frozenset()

    def prepare(self, batch: Any) -> Any:
        """A no-grad pass before the step (called under `torch.no_grad()` and the step's autocast)."""
        return batch

    def extra_counts(self, batch: Any) -> dict[str, int]:
        """Named counts on this micro-batch to be summed globally (`Normaliser.counts`)."""
        return {}

    def compute(self, model: nn.Module, batch: Any, normaliser: int) -> ObjectiveOutput:
        raise NotImplementedError

    def close(self) -> None:
        """Release what the objective holds outside this process (called once the run ends)."""


def normaliser_count(normaliser: str, batch: Any) -> int:
    """This micro-batch's count of the units `normaliser` names."""
    if normaliser == "tokens":
        return int(batch.num_trained_tokens)
    if normaliser == "sequences":
        return int(batch.num_documents)
    if normaliser == "pairs":
        assert batch.num_documents % 2 == 0, "a batch of pairs holds an even number of documents"
        return int(batch.num_documents) // 2
    raise ValueError(f"unknown normaliser {normaliser!r}; expected one of {NORMALISERS}")


def check_fields(objective: Objective, batch: Any) -> None:
    """Refuse a batch that lacks a field the objective needs or carries one it does not read."""
    present = set(getattr(batch, "fields", None) or {})
    missing = sorted(objective.required_fields - present)
    if missing:
        raise ValueError(
            f"objective {objective.name!r} needs the batch field(s) {missing}; the batch carries "
            f"{sorted(present) or 'none'}"
        )
    unused = sorted(present - objective.required_fields - objective.optional_fields)
    if unused:
        raise ValueError(
            f"the batch carries field(s) {unused} that objective {objective.name!r} does not use "
            f"(it reads {sorted(objective.required_fields | objective.optional_fields) or 'none'}); "
            "drop them upstream or declare them in the objective"
        )


class MetricTotals:
    """Sums and counts of each metric over micro-batches, reduced over ranks to global means."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.totals: dict[str, list[float | torch.Tensor]] = {}
        self.maxima: dict[str, float] = {}

    def add(self, metrics: Mapping[str, MetricValue], maxima: Mapping[str, torch.Tensor | float] | None = None) -> None:
        for name, value in (maxima or {}).items():
            self.maxima[name] = max(self.maxima.get(name, float("-inf")), float(value))
        for name, (total, count) in metrics.items():
            total = total.detach() if isinstance(total, torch.Tensor) else total
            count = count.detach() if isinstance(count, torch.Tensor) else count
            if name in self.totals:
                self.totals[name][0] = self.totals[name][0] + total
                self.totals[name][1] = self.totals[name][1] + count
            else:
                self.totals[name] = [total, count]

    def means(self, group: dist.ProcessGroup | None = None) -> dict[str, float]:
        """Global `sum / count` per metric (NaN where the count is 0) and the global maxima; every
        rank must call it with the same metric names (a collective when a process group of several
        ranks exists)."""
        names, peaks = sorted(self.totals), sorted(self.maxima)
        if not names and not peaks:
            return {}
        stacked = torch.tensor(
            [[float(self.totals[n][0]), float(self.totals[n][1])] for n in names],
            dtype=torch.float64,
            device=self.device,
        ).reshape(len(names), 2)
        top = torch.tensor([self.maxima[n] for n in peaks], dtype=torch.float64, device=self.device)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
            dist.all_reduce(stacked, group=group)
            if peaks:
                dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
        out = {
            name: (float(total / count) if count != 0 else float("nan"))
            for name, (total, count) in zip(names, stacked.tolist())
        }
        out.update(zip(peaks, top.tolist()))
        return out
