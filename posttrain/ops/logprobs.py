"""Per-token log-probabilities (and entropy) of the LM head for DPO, GRPO and distillation."""

from __future__ import annotations

import torch
from torch import Tensor

from posttrain.ops.head_stats import Plan, head_stats
from posttrain.ops.inputs import DEFAULT_CHUNK_SIZE, DEFAULT_VOCAB_CHUNK_SIZE, check_chunks, select


def linear_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    vocab_chunk_size: int = DEFAULT_VOCAB_CHUNK_SIZE,
    temperature: float = 1.0,
    return_entropy: bool = False,
    ignore_index: int = -100,
    vocab_size: int | None = None,
    matmul_dtype: torch.dtype | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """`log_softmax(hidden @ weight.T / temperature)` at `targets`, with gradients.

    `targets` has `hidden.shape[:-1]` and is already shifted, like labels; positions equal to
    `ignore_index` are not projected and get log-prob 0 (and entropy 0). Returns fp32 `logprobs`
    in the shape of `targets`, or `(logprobs, entropy)` with `return_entropy`, where `entropy`
    is that of the tempered distribution over the first `vocab_size` tokens. Both are
    differentiable (e.g. an entropy bonus). See `linear_cross_entropy` for the other arguments.
    """
    check_chunks(chunk_size, vocab_chunk_size)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    sel = select(
        hidden, weight, targets, ignore_index=ignore_index, vocab_size=vocab_size, matmul_dtype=matmul_dtype,
        name="targets",
    )  # fmt: skip
    plan = Plan(
        vocab_size=sel.vocab_size,
        chunk_size=chunk_size,
        vocab_chunk_size=vocab_chunk_size,
        compute_dtype=sel.compute_dtype,
        scale=1.0 / temperature,
        with_entropy=return_entropy,
    )
    lse, target, _, entropy, _ = head_stats(sel.hidden, weight, sel.targets, plan)
    logprobs = sel.scatter(target - lse)
    return (logprobs, sel.scatter(entropy)) if return_entropy else logprobs
