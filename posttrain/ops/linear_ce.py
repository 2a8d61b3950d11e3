"""Cross-entropy of `hidden @ weight.T` without the full logits (SFT, and the NLL term of DPO)."""

from __future__ import annotations

import torch
from torch import Tensor

from posttrain.ops.grads_in_forward import CrossEntropyGradsInForward
from posttrain.ops.head_stats import Plan, head_stats
from posttrain.ops.inputs import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_VOCAB_CHUNK_SIZE,
    check_chunks,
    check_reduction,
    denominator,
    reduce,
    select,
)


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    vocab_chunk_size: int = DEFAULT_VOCAB_CHUNK_SIZE,
    ignore_index: int = -100,
    reduction: str = "mean",
    z_loss: float = 0.0,
    label_smoothing: float = 0.0,
    num_valid: int | float | Tensor | None = None,
    vocab_size: int | None = None,
    grads_in_forward: bool = False,
    matmul_dtype: torch.dtype | None = None,
) -> Tensor:
    """Token cross-entropy of the LM head, equal to `F.cross_entropy(hidden @ weight.T, labels)`.

    Args:
        hidden: `[B, L, d]` or `[N, d]` final hidden states (after the final norm).
        weight: `[V_padded, d]` head weight (or the tied embedding), a plain tensor.
        labels: `hidden.shape[:-1]` token ids, already shifted (`labels[t]` is what position t
            predicts); `ignore_index` where nothing is trained. Those positions never reach the head.
        chunk_size / vocab_chunk_size: tile shape (tokens x vocabulary rows); memory, not results.
        reduction: "mean" (sum / num_valid), "sum", or "none" (fp32 per-token losses in the
            shape of `labels`, 0 at ignored positions).
        z_loss: weight of `logsumexp(logits)**2` per token, added to each token's loss.
        label_smoothing: as in `F.cross_entropy`, over the first `vocab_size` classes.
        num_valid: denominator of "mean": the trained-token count of the whole global batch
            (all ranks, all micro-batches; int or scalar tensor). Default: this call's count.
            Summing the results of every micro-batch and rank then gives the global mean, however
            the tokens are split. A count of 0 gives a loss of 0, not NaN.
        vocab_size: real vocabulary size; head rows from it on (padding) get no probability and
            no gradient. Default: all rows.
        matmul_dtype: dtype of the tile GEMMs. Default: the inputs' dtype (or the autocast
            dtype). `torch.float32` upcasts each tile of bf16 inputs: exact fp32 logits and
            gradients, and faster on CPUs without bf16 matrix units (bench/RESULTS.md).
        grads_in_forward: compute the gradients during the forward and keep only them (3 GEMMs
            per tile instead of 4, at the cost of a cached `[chunk, V]` logits chunk and an fp32
            `[V, d]` buffer; see `posttrain.ops.grads_in_forward`). Needs reduction "mean"/"sum".

    Returns an fp32 loss (scalar, or per token for "none") whatever the input dtype.
    """
    check_chunks(chunk_size, vocab_chunk_size)
    check_reduction(reduction)
    if z_loss < 0:
        raise ValueError(f"z_loss must be >= 0, got {z_loss}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    sel = select(
        hidden, weight, labels, ignore_index=ignore_index, vocab_size=vocab_size, matmul_dtype=matmul_dtype
    )
    plan = Plan(
        vocab_size=sel.vocab_size,
        chunk_size=chunk_size,
        vocab_chunk_size=vocab_chunk_size,
        compute_dtype=sel.compute_dtype,
        with_mean=label_smoothing > 0,
    )
    if grads_in_forward:
        if reduction == "none":
            raise ValueError('grads_in_forward needs reduction="mean" or "sum" (a scalar loss)')
        if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
            denom = denominator(sel, reduction, num_valid)
            return CrossEntropyGradsInForward.apply(
                sel.hidden, weight, sel.targets, plan, denom, float(z_loss), float(label_smoothing)
            )
    lse, target, mean, _, _ = head_stats(sel.hidden, weight, sel.targets, plan)
    if label_smoothing > 0:
        loss = lse - (1.0 - label_smoothing) * target - label_smoothing * mean
    else:
        loss = lse - target
    if z_loss > 0:
        loss = loss + z_loss * lse.square()
    return reduce(loss, sel, reduction, num_valid)
