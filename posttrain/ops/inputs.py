"""Argument checks and labelled-token selection shared by the public ops.

Every op selects the positions it trains on *before* the head: ignored tokens never reach the
GEMMs, so a batch with 40% prompt tokens costs 60% of the head's FLOPs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# Tokens x vocabulary rows per tile: 1,024 x 8,192 fp32 is a 32 MiB tile, large enough that the
# GEMMs run near peak on CPU and GPU, small enough to be noise next to a model's activations.
# Recipes take both from `train.chunk_size` / `train.vocab_chunk_size`, whose defaults these are.
DEFAULT_CHUNK_SIZE = 1024
DEFAULT_VOCAB_CHUNK_SIZE = 8192


@dataclass(frozen=True)
class Selected:
    """The labelled positions of a batch, flattened: what the head actually sees."""

    hidden: Tensor  # [n, d], differentiable view of the selected rows
    targets: Tensor  # [n] int64, all in [0, vocab_size)
    index: Tensor  # [n] positions in the flattened batch
    shape: torch.Size  # the batch shape of `labels` ([B, L] or [N])
    vocab_size: int
    compute_dtype: torch.dtype

    @property
    def count(self) -> int:
        return self.targets.numel()

    def scatter(self, values: Tensor) -> Tensor:
        """Per-token `values [n]` back to the batch shape, zero at unselected positions."""
        out = values.new_zeros(self.shape.numel())
        return out.index_copy(0, self.index, values).view(self.shape)


class _SelectRows(torch.autograd.Function):
    """`x.index_select(0, index)` for unique indices, with a backward that copies instead of
    accumulating (the generic index_add backward is ~5x slower on CPU)."""

    @staticmethod
    def forward(ctx, x: Tensor, index: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(index)
        ctx.rows = x.shape[0]
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (index,) = ctx.saved_tensors
        full = grad.new_zeros((ctx.rows, *grad.shape[1:]))
        return full.index_copy_(0, index, grad), None


def _is_dtensor(t: Tensor) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def check_chunks(chunk_size: int, vocab_chunk_size: int) -> None:
    for name, value in (("chunk_size", chunk_size), ("vocab_chunk_size", vocab_chunk_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_head(hidden: Tensor, weight: Tensor, vocab_size: int | None, *, role: str = "") -> int:
    """Validate `hidden`/`weight` and return the number of real vocabulary rows."""
    for name, t in ((f"{role}hidden", hidden), (f"{role}weight", weight)):
        if _is_dtensor(t):
            raise ValueError(
                f"{name} is a DTensor (a sharded FSDP2/TP parameter); posttrain.ops needs the full head "
                "weight as a plain tensor. Keep the LM head (and a tied embedding) in the root fully_shard "
                "unit and call the op after the model's forward: FSDP2 keeps root parameters unsharded "
                "until backward. Or call it inside the forward of the module that owns the head. "
                "See the posttrain.ops docstring."
            )
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if weight.dim() != 2:
        raise ValueError(f"{role}weight must be [vocab, hidden], got shape {tuple(weight.shape)}")
    if hidden.dim() not in (2, 3):
        raise ValueError(f"{role}hidden must be [B, L, d] or [N, d], got shape {tuple(hidden.shape)}")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{role}hidden size {hidden.shape[-1]} does not match {role}weight [vocab, hidden] "
            f"shape {tuple(weight.shape)}; pass the LM head weight (or the tied embedding), not its transpose"
        )
    if hidden.device != weight.device:
        raise ValueError(f"{role}hidden is on {hidden.device} but {role}weight is on {weight.device}")
    padded = weight.shape[0]
    if vocab_size is None:
        return padded
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or not 0 < vocab_size <= padded:
        raise ValueError(
            f"vocab_size must be an int in [1, {padded}] (the rows of the padded head), got {vocab_size!r}"
        )
    return vocab_size


def compute_dtype(hidden: Tensor, weight: Tensor, matmul_dtype: torch.dtype | None = None) -> torch.dtype:
    """The dtype of the tile GEMMs: `matmul_dtype` if given, the autocast dtype if autocast is on,
    else the inputs' dtype."""
    if matmul_dtype is not None:
        if not isinstance(matmul_dtype, torch.dtype) or not matmul_dtype.is_floating_point:
            raise ValueError(f"matmul_dtype must be a floating-point torch.dtype, got {matmul_dtype!r}")
        return matmul_dtype
    if torch.is_autocast_enabled(hidden.device.type):
        return torch.get_autocast_dtype(hidden.device.type)
    if hidden.dtype != weight.dtype:
        raise ValueError(
            f"hidden is {hidden.dtype} but weight is {weight.dtype}; cast one of them, or run under "
            "torch.autocast to compute the head in the autocast dtype"
        )
    return hidden.dtype


def select(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    ignore_index: int,
    vocab_size: int | None,
    matmul_dtype: torch.dtype | None = None,
    name: str = "labels",
) -> Selected:
    """Check the arguments and keep only the positions whose label is not `ignore_index`."""
    vocab = check_head(hidden, weight, vocab_size)
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor of token ids, got {labels.dtype}")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(
            f"{name} shape {tuple(labels.shape)} must equal hidden's leading shape "
            f"{tuple(hidden.shape[:-1])} ({name} are already shifted: {name}[t] is what position t predicts)"
        )
    flat = labels.reshape(-1)
    index = (flat != ignore_index).nonzero().squeeze(1)
    targets = flat.index_select(0, index).long()
    if targets.numel():
        low, high = (int(x) for x in torch.aminmax(targets))
        if low < 0 or high >= vocab:
            bad = low if low < 0 else high
            raise ValueError(
                f"{name} contain id {bad}, outside [0, {vocab}) and not ignore_index={ignore_index}; "
                "check the tokenizer/model vocabulary, vocab_size, and the ignore_index used by the data"
            )
    return Selected(
        hidden=_SelectRows.apply(hidden.reshape(-1, hidden.shape[-1]), index),
        targets=targets,
        index=index,
        shape=labels.shape,
        vocab_size=vocab,
        compute_dtype=compute_dtype(hidden, weight, matmul_dtype),
    )


def denominator(sel: Selected, reduction: str, num_valid: int | float | Tensor | None) -> Tensor:
    """What the summed loss is divided by: 1 for "sum", else `num_valid` (default: this call's count).

    Clamped to at least 1, so a batch (or global batch) without trained tokens gives 0, not NaN.
    """
    device = sel.targets.device
    if reduction != "mean":
        if num_valid is not None:
            raise ValueError('num_valid only applies to reduction="mean"')
        return torch.ones((), device=device)
    if num_valid is None:
        return torch.tensor(float(max(sel.count, 1)), device=device)
    if isinstance(num_valid, Tensor):
        if num_valid.numel() != 1:
            raise ValueError(f"num_valid must be a scalar, got shape {tuple(num_valid.shape)}")
        return num_valid.reshape(()).to(device=device, dtype=torch.float32).clamp(min=1)
    if isinstance(num_valid, bool) or not isinstance(num_valid, (int, float)) or num_valid < 0:
        raise ValueError(
            f"num_valid must be the global count of trained tokens (a non-negative number or a "
            f"scalar tensor), got {num_valid!r}"
        )
    return torch.tensor(float(max(num_valid, 1)), device=device)


def reduce(loss: Tensor, sel: Selected, reduction: str, num_valid: int | float | Tensor | None) -> Tensor:
    """Apply `reduction` to per-token losses `[n]`; "mean" divides by `num_valid` if given."""
    if reduction == "none":
        if num_valid is not None:
            raise ValueError('num_valid only applies to reduction="mean"')
        return sel.scatter(loss)
    return loss.sum() / denominator(sel, reduction, num_valid)


def check_reduction(reduction: str) -> None:
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f'reduction must be "mean", "sum" or "none", got {reduction!r}')
