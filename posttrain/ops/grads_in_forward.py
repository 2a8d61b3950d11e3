"""Cross-entropy whose forward also computes the input gradients ("grads in forward").

The default path (`head_stats`) recomputes each tile's logits in the backward: 4 GEMMs per tile
in all. When the loss is reduced to a scalar inside the op (reduction "mean"/"sum"), the
gradient of every logit is known as soon as its token's log-sum-exp is, so the forward can
finish the job with 3 GEMMs and keep only `grad_hidden` and `grad_weight`; the backward just
scales them by the incoming scalar. The price is memory: each token chunk keeps its logits for
the whole vocabulary (in the compute dtype) until its log-sum-exp is known, and `grad_weight`
is summed over token chunks in an fp32 `[V, d]` buffer. bench/RESULTS.md has the trade-off
measured; `linear_cross_entropy(..., grads_in_forward=True)` selects this path.
"""

from __future__ import annotations

import torch
from torch import Tensor

from posttrain.ops.head_stats import Plan, _add_mm, _spans, _target_in_tile, tile_logsumexp_

# Upper bound on the logits a token chunk keeps (bytes): chunks shrink for large vocabularies.
MAX_CACHED_LOGITS_BYTES = 256 * 2**20


def cached_chunk_size(plan: Plan, models: int = 1) -> int:
    """Tokens per chunk such that one chunk's logits of `models` heads (a student and its teacher:
    2) stay within `MAX_CACHED_LOGITS_BYTES` together."""
    per_token = models * plan.vocab_size * torch.empty((), dtype=plan.compute_dtype).element_size()
    return max(1, min(plan.chunk_size, MAX_CACHED_LOGITS_BYTES // per_token))


class CrossEntropyGradsInForward(torch.autograd.Function):
    """`sum_i loss_i / denominator`, with gradients computed in the forward.

    loss_i = lse_i - (1 - eps) z_{i,y} - eps mean_v z_{i,v} + z_loss lse_i^2.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        hidden: Tensor,
        weight: Tensor,
        targets: Tensor,
        plan: Plan,
        denominator: Tensor,
        z_loss: float,
        label_smoothing: float,
    ) -> Tensor:
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        with torch.autocast(hidden.device.type, enabled=False):
            total, grad_hidden, grad_weight = _run(
                hidden, weight, targets, plan, denominator, z_loss, label_smoothing, need_hidden, need_weight
            )
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        grad_hidden, grad_weight = ctx.saved_tensors
        return _scaled(grad_hidden, grad), _scaled(grad_weight, grad), None, None, None, None, None


def add_tile_grads(gz: Tensor, h: Tensor, w: Tensor, grad_h: Tensor | None, grad_w: Tensor | None, rows: slice,
                   cols: slice, several: bool) -> None:
    """Add one tile's logits gradient `gz [rows, cols]` into `grad_h` (via the head rows `w`) and
    `grad_w` (via the hidden rows `h`; summed in fp32 when there are `several` token chunks)."""
    if grad_h is not None:
        _add_mm(grad_h[rows], gz, w)
    if grad_w is not None:
        if several:
            _add_mm(grad_w[cols], gz.t(), h)
        else:
            grad_w[cols] = torch.mm(gz.t(), h)


def _scaled(precomputed: Tensor | None, grad: Tensor) -> Tensor | None:
    return None if precomputed is None else precomputed * grad.to(precomputed.dtype)


def _run(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    plan: Plan,
    denominator: Tensor,
    z_loss: float,
    eps: float,
    need_hidden: bool,
    need_weight: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    n, dtype, device = hidden.shape[0], plan.compute_dtype, hidden.device
    inv = 1.0 / denominator.to(device=device, dtype=torch.float32)
    chunk = cached_chunk_size(plan)
    several = n > chunk
    grad_h = torch.zeros(hidden.shape, device=device, dtype=torch.float32) if need_hidden else None
    # grad_weight is summed over token chunks: in fp32 when there are several
    acc_dtype = torch.float32 if several else weight.dtype
    grad_w = torch.zeros(weight.shape, device=device, dtype=acc_dtype) if need_weight else None
    total = torch.zeros((), device=device, dtype=torch.float32)
    for rows in _spans(n, chunk):
        h, y = hidden[rows].to(dtype), targets[rows]
        lse = torch.full((h.shape[0],), float("-inf"), device=device)
        target = torch.zeros(h.shape[0], device=device)
        mean = torch.zeros(h.shape[0], device=device)
        tiles = []
        for cols in _spans(plan.vocab_size, plan.vocab_chunk_size):
            raw = torch.mm(h, weight[cols].to(dtype).t())
            tiles.append((cols, raw))
            z = raw.float() if raw.dtype != torch.float32 else raw.clone()
            local, inside = _target_in_tile(y, cols)
            target = torch.where(inside, z.gather(1, local.unsqueeze(1)).squeeze(1), target)
            if eps:
                mean += z.sum(1) / plan.vocab_size
            lse = torch.logaddexp(lse, tile_logsumexp_(z))
        loss = lse - (1.0 - eps) * target - eps * mean
        if z_loss:
            loss = loss + z_loss * lse.square()
        total += loss.sum()
        # d loss_i / dz_v = (1 + 2 z_loss lse_i) p_v - (1 - eps) [v = y_i] - eps / V, over the denominator
        c_p = ((1.0 + 2.0 * z_loss * lse) * inv).unsqueeze(1)
        c_target = torch.full((h.shape[0], 1), -(1.0 - eps), device=device) * inv
        for cols, raw in tiles:
            gz = raw.float().sub_(lse.unsqueeze(1)).exp_().mul_(c_p)
            if eps:
                gz.sub_(inv * (eps / plan.vocab_size))
            local, inside = _target_in_tile(y, cols)
            gz.scatter_add_(1, local.unsqueeze(1), torch.where(inside.unsqueeze(1), c_target, 0.0))
            add_tile_grads(gz.to(dtype), h, weight[cols].to(dtype), grad_h, grad_w, rows, cols, several)
        del tiles
    return (
        total * inv,
        grad_h.to(hidden.dtype) if grad_h is not None else None,
        grad_w.to(weight.dtype) if grad_w is not None else None,
    )
