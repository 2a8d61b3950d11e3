"""One optimiser step over several micro-batches, written once for every recipe (SPMD).

The loss of a step is the sum of per-token losses over every trained token of the *global* batch
(all micro-batches on all ranks) divided by the global number of trained tokens. Each micro-batch
therefore back-propagates `local_sum * world_size / global_tokens`: data-parallel wrappers average
gradients over ranks, which divides by `world_size` again, so the result does not depend on how the
tokens were split between micro-batches and ranks.

With tensor parallelism the data-parallel ranks are a subgroup (`dp_group`): the ranks of one
tensor-parallel group see the same batch, so counts and losses are reduced over `dp_group` only,
and the loss is scaled by its size (FSDP2 averages gradients over that dimension).

What is summed and what it is divided by belongs to the objective (`train/objective.py`): the
engine counts the objective's normaliser (trained tokens, documents or pairs) over the global
batch, runs its no-grad `prepare` pass, checks the batch fields it declares, and reduces its
metric sums to global means.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import DTensor

from posttrain.train.objective import MetricTotals, Normaliser, Objective, check_fields, normaliser_count


class MicroBatch(Protocol):
    num_tokens: int
    num_trained_tokens: int
    num_documents: int


@dataclass
class StepStats:
    loss: float  # mean per normaliser unit (trained token, document, pair) over the global batch
    grad_norm: float
    num_tokens: int  # global, padding excluded
    num_trained_tokens: int  # global
    num_documents: int  # global
    skipped: bool = False  # True when the gradient was not finite and the update was skipped
    metrics: dict[str, float] = field(default_factory=dict)  # the objective's, global means
    num_units: int = 0  # global count of the objective's normaliser


def autocast_context(precision: str, device_type: str) -> contextlib.AbstractContextManager:
    """bf16 autocast for `bf16_autocast`; nothing for fp32 and for bf16 weights."""
    if precision == "bf16_autocast":
        return torch.autocast(device_type=device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _world(group: dist.ProcessGroup | None = None) -> tuple[int, bool]:
    """Size of `group` (default: the world) and whether a process group is up."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(group), True
    return 1, False


def global_counts(
    micro_batches: Sequence[MicroBatch],
    device: torch.device,
    group: dist.ProcessGroup | None = None,
    objective: Objective | None = None,
) -> tuple[int, int, int, Normaliser]:
    """(tokens, trained tokens, documents, the objective's normaliser with its extra counts)
    summed over micro-batches and the ranks of `group`, in one all-reduce. Without an objective
    the normaliser counts trained tokens."""
    unit = objective.normaliser if objective is not None else "tokens"
    extra = [objective.extra_counts(mb) for mb in micro_batches] if objective is not None else []
    names = sorted({name for counts in extra for name in counts})
    counts = torch.tensor(
        [
            sum(mb.num_tokens for mb in micro_batches),
            sum(mb.num_trained_tokens for mb in micro_batches),
            sum(mb.num_documents for mb in micro_batches),
            sum(normaliser_count(unit, mb) for mb in micro_batches),
            *(sum(c.get(name, 0) for c in extra) for name in names),
        ],
        dtype=torch.int64,
        device=device,
    )
    world_size, distributed = _world(group)
    if distributed and world_size > 1:
        dist.all_reduce(counts, group=group)
    tokens, trained, documents, units, *rest = (int(c) for c in counts.tolist())
    return tokens, trained, documents, Normaliser(units, dict(zip(names, rest)))


def prepare_batches(
    objective: Objective, micro_batches: Sequence[Any], precision: str, device: torch.device
) -> list[Any]:
    """The objective's no-grad pass over every micro-batch, then its field check."""
    prepared = []
    for mb in micro_batches:
        with torch.no_grad(), autocast_context(precision, device.type):
            mb = objective.prepare(mb)
        check_fields(objective, mb)
        prepared.append(mb)
    return prepared


def _grad_norm(grads: list[torch.Tensor], norm_type: float = 2.0) -> torch.Tensor:
    """Total norm of gradients that may be DTensors on different meshes (FSDP over TP leaves
    norms and embeddings on the data-parallel mesh, the split matrices on both)."""
    groups: dict[Any, list[torch.Tensor]] = {}
    for g in grads:
        key = (id(g.device_mesh), g.placements) if isinstance(g, DTensor) else None
        groups.setdefault(key, []).append(g)
    norms = []
    for group in groups.values():
        norm = torch.nn.utils.get_total_norm(group, norm_type)
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    return torch.nn.utils.get_total_norm(norms, norm_type)


def _grads_to_param_layout(params: list[nn.Parameter]) -> None:
    """Reduce `Partial` DTensor gradients to their parameter's placements.

    Under tensor parallelism a weight replicated over the ranks but applied to sharded
    activations (per-head norms, a colwise layer's `lora_A`) gets each rank's share of its
    gradient; FSDP2 sums it when it wraps the model, without FSDP it is summed here.
    """
    for p in params:
        if isinstance(p.grad, DTensor) and p.grad.placements != p.placements:
            p.grad = p.grad.redistribute(placements=p.placements)


def _clip_grads(params: list[nn.Parameter], max_norm: float | None) -> torch.Tensor:
    """Clip to `max_norm` (None: only measure); returns the total norm before clipping."""
    grads = [p.grad for p in params]
    if not any(isinstance(g, DTensor) for g in grads):
        if max_norm is not None and max_norm > 0:
            return torch.nn.utils.clip_grad_norm_(params, max_norm)
        return torch.nn.utils.get_total_norm(grads)
    total = _grad_norm(grads)
    if max_norm is not None and max_norm > 0:
        coef = float(torch.clamp(max_norm / (total + 1e-6), max=1.0))
        for g in grads:
            g.mul_(coef)
    return total


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: Sequence[MicroBatch],
    objective: Objective,
    *,
    grad_clip: float | None,
    precision: str = "fp32",
    device: torch.device | str = "cpu",
    dp_group: dist.ProcessGroup | None = None,
) -> StepStats:
    """Prepare, forward/backward every micro-batch, clip, and step the optimiser (not the scheduler).

    `dp_group`: the data-parallel ranks (default: all ranks).
    """
    device = torch.device(device)
    world_size, distributed = _world(dp_group)
    tokens, trained, documents, units = global_counts(micro_batches, device, dp_group, objective)
    micro_batches = prepare_batches(objective, micro_batches, precision, device)
    num_valid = Normaliser(max(units, 1), units.counts)
    loss_total = torch.zeros((), dtype=torch.float32, device=device)
    metrics = MetricTotals(device)
    model.train()
    for mb in micro_batches:
        with autocast_context(precision, device.type):
            out = objective.compute(model, mb, num_valid)
        (out.loss * world_size).backward()
        loss_total += out.loss.detach().float()
        metrics.add(out.metrics, out.maxima)
    if distributed and world_size > 1:
        dist.all_reduce(loss_total, group=dp_group)
    params = [p for p in model.parameters() if p.grad is not None]
    _grads_to_param_layout(params)
    grad_norm = _clip_grads(params, grad_clip)
    grad_norm_value = float(grad_norm)
    skipped = not math.isfinite(grad_norm_value)
    if not skipped:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepStats(
        loss=float(loss_total),
        grad_norm=grad_norm_value,
        num_tokens=tokens,
        num_trained_tokens=trained,
        num_documents=documents,
        skipped=skipped,
        metrics=metrics.means(dp_group),
        num_units=int(units),
    )


@torch.no_grad()
def evaluate_objective(
    model: nn.Module,
    batches: Sequence[MicroBatch],
    objective: Objective,
    *,
    precision: str = "fp32",
    device: torch.device | str = "cpu",
    dp_group: dist.ProcessGroup | None = None,
) -> dict[str, float]:
    """`loss` (mean per normaliser unit over `batches` on all data-parallel ranks, NaN when there
    is none) and the objective's metrics, without gradients."""
    device = torch.device(device)
    *_, units = global_counts(batches, device, dp_group, objective)
    if units == 0:
        return {"loss": float("nan")}
    batches = prepare_batches(objective, batches, precision, device)
    total = torch.zeros((), dtype=torch.float32, device=device)
    metrics = MetricTotals(device)
    was_training = model.training
    model.eval()
    for mb in batches:
        with autocast_context(precision, device.type):
            out = objective.compute(model, mb, units)
        total += out.loss.float()
        metrics.add(out.metrics, out.maxima)
    world_size, distributed = _world(dp_group)
    if distributed and world_size > 1:
        dist.all_reduce(total, group=dp_group)
    model.train(was_training)
    return {"loss": float(total), **metrics.means(dp_group)}
