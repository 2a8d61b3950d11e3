"""One optimiser step over several micro-batches, written once for every recipe (SPMD).

The loss of a step is the sum of per-token losses over every trained token of the *global* batch
(all micro-batches on all ranks) divided by the global number of trained tokens. Each micro-batch
therefore back-propagates `local_sum * world_size / global_tokens`: data-parallel wrappers average
gradients over ranks, which divides by `world_size` again, so the result does not depend on how the
tokens were split between micro-batches and ranks.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.nn as nn


class MicroBatch(Protocol):
    num_tokens: int
    num_trained_tokens: int
    num_documents: int


# (model, micro_batch, num_valid) -> sum of per-token losses on this micro-batch divided by
# num_valid. num_valid is the global trained-token count.
LossFn = Callable[[nn.Module, Any, int], torch.Tensor]


@dataclass
class StepStats:
    loss: float  # mean per trained token over the global batch
    grad_norm: float
    num_tokens: int  # global, padding included
    num_trained_tokens: int  # global
    num_documents: int  # global
    skipped: bool = False  # True when the gradient was not finite and the update was skipped


def autocast_context(precision: str, device_type: str) -> contextlib.AbstractContextManager:
    """bf16 autocast for `bf16_autocast`; nothing for fp32 and for bf16 weights."""
    if precision == "bf16_autocast":
        return torch.autocast(device_type=device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _world() -> tuple[int, bool]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), True
    return 1, False


def global_counts(micro_batches: Sequence[MicroBatch], device: torch.device) -> list[int]:
    """(tokens, trained tokens, documents) summed over micro-batches and ranks."""
    counts = torch.tensor(
        [
            sum(mb.num_tokens for mb in micro_batches),
            sum(mb.num_trained_tokens for mb in micro_batches),
            sum(mb.num_documents for mb in micro_batches),
        ],
        dtype=torch.int64,
        device=device,
    )
    world_size, distributed = _world()
    if distributed and world_size > 1:
        dist.all_reduce(counts)
    return [int(c) for c in counts.tolist()]


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: Sequence[MicroBatch],
    loss_fn: LossFn,
    *,
    grad_clip: float | None,
    precision: str = "fp32",
    device: torch.device | str = "cpu",
) -> StepStats:
    """Forward/backward every micro-batch, clip, and step the optimiser (not the scheduler)."""
    device = torch.device(device)
    world_size, distributed = _world()
    tokens, trained, documents = global_counts(micro_batches, device)
    num_valid = max(trained, 1)
    loss_total = torch.zeros((), dtype=torch.float32, device=device)
    model.train()
    for mb in micro_batches:
        with autocast_context(precision, device.type):
            loss = loss_fn(model, mb, num_valid)
        (loss * world_size).backward()
        loss_total += loss.detach().float()
    if distributed and world_size > 1:
        dist.all_reduce(loss_total)
    params = [p for p in model.parameters() if p.grad is not None]
    if grad_clip is not None and grad_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    else:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if hasattr(grad_norm, "full_tensor"):  # DTensor under FSDP2
        grad_norm = grad_norm.full_tensor()
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
    )


@torch.no_grad()
def eval_loss(
    model: nn.Module,
    batches: Sequence[MicroBatch],
    loss_fn: LossFn,
    *,
    precision: str = "fp32",
    device: torch.device | str = "cpu",
) -> float:
    """Mean per-token loss over `batches` (all ranks), without gradients."""
    device = torch.device(device)
    _, trained, _ = global_counts(batches, device)
    if trained == 0:
        return float("nan")
    total = torch.zeros((), dtype=torch.float32, device=device)
    was_training = model.training
    model.eval()
    for mb in batches:
        with autocast_context(precision, device.type):
            total += loss_fn(model, mb, trained).float()
    world_size, distributed = _world()
    if distributed and world_size > 1:
        dist.all_reduce(total)
    model.train(was_training)
    return float(total)
