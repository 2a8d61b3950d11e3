"""A model's top-k distribution per trained token, through the chunked head (no gradients).

    out = linear_topk(hidden, weight, labels, k=32, temperature=2.0, vocab_size=V)
    out.topk      TopK(ids [n, k], logprobs [n, k] at the temperature, tail [n])
    out.ce        [n] cross-entropy of the label at T = 1

What a distillation teacher's table stores (`teacher_signal: topk`). The tail is the log of the
softmax mass outside the k ids, summed over the other logits directly rather than taken as
`log(1 - sum)`, which loses everything below fp32's resolution of 1 (a tail of 1e-9 would become
0, and a reverse KL against it infinite).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from posttrain.ops.distill import TopK, _head_tiles, _Stats, logsumexp_without_
from posttrain.ops.grads_in_forward import cached_chunk_size
from posttrain.ops.head_stats import Plan, _spans
from posttrain.ops.inputs import DEFAULT_CHUNK_SIZE, DEFAULT_VOCAB_CHUNK_SIZE, check_chunks, select


@dataclass
class TopKOutput:
    topk: TopK
    ce: Tensor


@torch.no_grad()
def linear_topk(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    k: int,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    vocab_chunk_size: int = DEFAULT_VOCAB_CHUNK_SIZE,
    ignore_index: int = -100,
    vocab_size: int | None = None,
    matmul_dtype: torch.dtype | None = None,
) -> TopKOutput:
    """The top-k of `softmax(hidden @ weight.T / T)` at every trained position (row-major order)."""
    check_chunks(chunk_size, vocab_chunk_size)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    sel = select(hidden, weight, labels, ignore_index=ignore_index, vocab_size=vocab_size, matmul_dtype=matmul_dtype)
    if not 1 <= k <= sel.vocab_size:
        raise ValueError(f"k must be in [1, {sel.vocab_size}] (the vocabulary), got {k}")
    plan = Plan(vocab_size=sel.vocab_size, chunk_size=chunk_size, vocab_chunk_size=vocab_chunk_size,
                compute_dtype=sel.compute_dtype, scale=1.0 / temperature)
    n, device = sel.count, hidden.device
    chunk = cached_chunk_size(plan)
    ids = torch.zeros(n, k, dtype=torch.long, device=device)
    logprobs, tail, ce = torch.zeros(n, k, device=device), torch.zeros(n, device=device), torch.zeros(n, device=device)
    with torch.autocast(device.type, enabled=False):
        for rows in _spans(n, chunk):
            tiles = _head_tiles(sel.hidden[rows].detach().to(plan.compute_dtype), weight.detach(), plan)
            ids[rows], logprobs[rows], tail[rows], ce[rows] = _chunk(tiles, sel.targets[rows], k, plan)
    return TopKOutput(TopK(ids, logprobs, tail), ce)


def _chunk(tiles: list[tuple[slice, Tensor]], targets: Tensor, k: int, plan: Plan):
    c, device = targets.shape[0], targets.device
    stats = _Stats.of(tiles, targets, plan)
    best_values = torch.full((c, 0), float("-inf"), device=device)
    best_ids = torch.zeros((c, 0), dtype=torch.long, device=device)
    for cols, raw in tiles:  # a running top-k, merged tile by tile
        values, where = (raw.float() * plan.scale).topk(min(k, raw.shape[1]), 1)
        merged_values = torch.cat([best_values, values], 1)
        merged_ids = torch.cat([best_ids, where + cols.start], 1)
        best_values, order = merged_values.topk(min(k, merged_values.shape[1]), 1)
        best_ids = merged_ids.gather(1, order)
    rest = torch.full((c,), float("-inf"), device=device)
    for cols, raw in tiles:
        rest = torch.logaddexp(rest, logsumexp_without_(raw.float() * plan.scale, best_ids, cols))
    return best_ids, best_values - stats.lse.unsqueeze(1), rest - stats.lse, stats.lse1 - stats.target
