"""Reference implementations and comparisons for the ops tests (full logits, plain autograd)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE = -100


def rel_err(actual: Tensor, expected: Tensor) -> float:
    """Norm-wise relative error (robust to near-zero entries, unlike element-wise rtol)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    return float((actual - expected).norm() / expected.norm().clamp(min=1e-30))


def make_inputs(
    shape: tuple[int, ...] = (3, 17),
    dim: int = 32,
    vocab: int = 97,
    padded: int | None = None,
    dtype: torch.dtype = torch.float32,
    ignore_frac: float = 0.3,
    seed: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, dim, generator=gen).to(dtype).requires_grad_()
    weight = (torch.randn(padded or vocab, dim, generator=gen) * dim**-0.5 * 3).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, shape, generator=gen)
    labels[torch.rand(shape, generator=gen) < ignore_frac] = IGNORE
    return hidden, weight, labels


def naive_ce(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    reduction: str = "mean",
    z_loss: float = 0.0,
    label_smoothing: float = 0.0,
    vocab_size: int | None = None,
) -> Tensor:
    """`F.cross_entropy(hidden @ W.T)` in fp32, plus the z-loss, with an all-ignored mean of 0."""
    logits = (hidden.float().reshape(-1, hidden.shape[-1]) @ weight.float()[: vocab_size or weight.shape[0]].t())
    flat = labels.reshape(-1)
    losses = F.cross_entropy(logits, flat, reduction="none", label_smoothing=label_smoothing)
    if z_loss:
        losses = losses + z_loss * torch.logsumexp(logits, -1).square() * (flat != IGNORE)
    losses = losses * (flat != IGNORE)
    if reduction == "none":
        return losses.view(labels.shape)
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / max(int((flat != IGNORE).sum()), 1)


def grads(loss: Tensor, *inputs: Tensor) -> tuple[Tensor, ...]:
    return torch.autograd.grad(loss, inputs)
