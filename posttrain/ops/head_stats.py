"""The one chunked path through the LM head that every loss in `posttrain.ops` goes through.

`head_stats` projects `hidden [N, d]` through `weight [V_padded, d]` one tile at a time (a tile
is `chunk_size` tokens x `vocab_chunk_size` vocabulary rows) and returns per-token statistics of
the softmax over the scaled logits `z = scale * hidden @ weight[:vocab_size].T`:

    lse      log sum_v exp(z_v)
    target   z_y, the logit of the token's target y
    mean     (1/V) sum_v z_v                      only with `Plan.with_mean` (label smoothing)
    entropy  -sum_v p_v log p_v                   only with `Plan.with_entropy`
    kl       sum_v q_v (log q_v - log p_v)        only with a `Teacher` (distillation)

Every loss is then a few element-wise operations on these fp32 `[N]` vectors: autograd composes
the loss and hands `head_stats` one gradient per statistic, and the backward turns them into the
gradient of each tile's logits (recomputed there, never stored) and then into the gradients of
`hidden` and `weight`. The full `[N, V]` logits never exist, in the forward or the backward.

Numerics: each tile's GEMM runs in the compute dtype (bf16 GEMMs accumulate in fp32 internally
and are ~4x faster than fp32 on our CPUs); the tile is then upcast, and all softmax math, the
running statistics and the gradient accumulators are fp32. Gradients come back in the dtypes of
`hidden` and `weight`.

Loop order: the forward walks token chunks and folds their vocabulary tiles into an online
log-sum-exp. The backward walks vocabulary chunks, so each slice of `grad_weight` is completed
by one GEMM over a token chunk (an fp32 sum when there are several token chunks) and only
`grad_hidden [N, d]` is carried across chunks, in fp32. Carrying `grad_weight` across token
chunks instead would need an fp32 copy of the whole head and a pass over it per chunk.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Plan:
    """Static settings of one `head_stats` call."""

    vocab_size: int  # rows of `weight` that are real tokens; padded rows beyond are never read
    chunk_size: int  # tokens per tile
    vocab_chunk_size: int  # vocabulary rows per tile
    compute_dtype: torch.dtype  # dtype of the tile GEMMs
    scale: float = 1.0  # logits multiplier (1 / temperature)
    with_mean: bool = False
    with_entropy: bool = False


@dataclass(frozen=True)
class Teacher:
    """The teacher distribution q for `kl`, produced tile by tile like the student's.

    Either `logits [M, >=V]` whose row `index[i]` belongs to student token i (the teacher logits
    stay unselected: only tiles are copied), or `hidden [N, d_t]` with `weight [>=V, d_t]`
    (projected tile by tile, like the student). No gradient reaches the teacher. `scale` is
    1 / temperature.
    """

    logits: Tensor | None = None
    index: Tensor | None = None
    hidden: Tensor | None = None
    weight: Tensor | None = None
    scale: float = 1.0

    def tile(self, rows: slice, cols: slice, dtype: torch.dtype) -> Tensor:
        if self.logits is not None:
            assert self.index is not None
            # index_select copies, so callers may modify the tile in place
            z = self.logits[:, cols].index_select(0, self.index[rows]).float()
            return z.mul_(self.scale) if self.scale != 1.0 else z
        assert self.hidden is not None and self.weight is not None
        return _logits(self.hidden[rows].to(dtype), self.weight[cols].to(dtype), self.scale)


def head_stats(
    hidden: Tensor, weight: Tensor, targets: Tensor, plan: Plan, teacher: Teacher | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """`(lse, target, mean, entropy, kl)`, each fp32 `[N]` (or empty `[0]` when not asked for).

    `hidden [N, d]` and `weight [V_padded, d]` get gradients; `targets [N]` must lie in
    `[0, plan.vocab_size)` (callers select labelled tokens and validate first).
    """
    return _HeadStats.apply(hidden, weight, targets, plan, teacher)


def _spans(total: int, step: int) -> Iterator[slice]:
    for start in range(0, total, step):
        yield slice(start, min(start + step, total))


def _logits(h: Tensor, w: Tensor, scale: float) -> Tensor:
    """fp32 logits of one tile; the GEMM runs in the inputs' dtype."""
    z = torch.mm(h, w.t())
    z = z.float() if z.dtype != torch.float32 else z
    return z.mul_(scale) if scale != 1.0 else z


def tile_logsumexp_(z: Tensor) -> Tensor:
    """Row-wise log-sum-exp that overwrites `z` (one temporary-free pass instead of logsumexp's)."""
    top = z.amax(1)
    top = torch.where(torch.isinf(top), 0.0, top)  # rows of -inf (or +inf) must not become NaN here
    return z.sub_(top.unsqueeze(1)).exp_().sum(1).log_().add_(top)


def _add_mm(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """`acc += a @ b` with an fp32 `acc` (a bf16 product is rounded once, then summed in fp32)."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    else:
        acc.add_(torch.mm(a, b))


def _target_in_tile(targets: Tensor, cols: slice) -> tuple[Tensor, Tensor]:
    """Targets relative to a vocabulary tile (clamped into it), and which rows have theirs inside."""
    local = targets - cols.start
    inside = (local >= 0) & (local < cols.stop - cols.start)
    return local.clamp(0, cols.stop - cols.start - 1), inside


def _teacher_lse(teacher: Teacher, n: int, plan: Plan, device: torch.device) -> Tensor:
    lse = torch.full((n,), float("-inf"), device=device)
    for rows in _spans(n, plan.chunk_size):
        for cols in _spans(plan.vocab_size, plan.vocab_chunk_size):
            tile_lse = torch.logsumexp(teacher.tile(rows, cols, plan.compute_dtype), 1)
            lse[rows] = torch.logaddexp(lse[rows], tile_lse)
    return lse


class _HeadStats(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx, hidden: Tensor, weight: Tensor, targets: Tensor, plan: Plan, teacher: Teacher | None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        ctx.set_materialize_grads(False)
        with torch.autocast(hidden.device.type, enabled=False):
            stats = _forward(hidden, weight, targets, plan, teacher)
        lse, target, mean, entropy, kl, teacher_lse = stats
        ctx.plan, ctx.teacher = plan, teacher
        ctx.save_for_backward(hidden, weight, targets, lse, entropy, teacher_lse)
        return lse, target, mean, entropy, kl

    @staticmethod
    def backward(ctx, *grads: Tensor | None):  # type: ignore[override]
        hidden, weight, targets, lse, entropy, teacher_lse = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        # statistics that were not asked for are empty; a gradient for them carries nothing
        grads = tuple(g if g is not None and g.numel() == lse.numel() else None for g in grads)
        if not (need_hidden or need_weight) or all(g is None for g in grads):
            return None, None, None, None, None
        with torch.autocast(hidden.device.type, enabled=False):
            grad_hidden, grad_weight = _backward(
                hidden, weight, targets, lse, entropy, teacher_lse, ctx.plan, ctx.teacher,
                grads, need_hidden, need_weight,
            )  # fmt: skip
        return grad_hidden, grad_weight, None, None, None


def _forward(
    hidden: Tensor, weight: Tensor, targets: Tensor, plan: Plan, teacher: Teacher | None
) -> tuple[Tensor, ...]:
    n, device, dtype = hidden.shape[0], hidden.device, plan.compute_dtype

    def fp32(size: int) -> Tensor:
        return torch.zeros(size, device=device, dtype=torch.float32)

    lse = torch.full((n,), float("-inf"), device=device)
    target = fp32(n)
    total = fp32(n if plan.with_mean else 0)
    # sum_v p_v log p_v over the tiles seen so far, with p normalised by the running lse
    neg_entropy = fp32(n if plan.with_entropy else 0)
    q_gap = fp32(n if teacher is not None else 0)  # sum_v q_v (t_v - z_v)
    teacher_lse = _teacher_lse(teacher, n, plan, device) if teacher is not None else fp32(0)

    for rows in _spans(n, plan.chunk_size):
        h = hidden[rows].to(dtype)
        run_lse = lse[rows]
        for cols in _spans(plan.vocab_size, plan.vocab_chunk_size):
            z = _logits(h, weight[cols].to(dtype), plan.scale)
            local, inside = _target_in_tile(targets[rows], cols)
            picked = z.gather(1, local.unsqueeze(1)).squeeze(1)
            target[rows] = torch.where(inside, picked, target[rows])
            if plan.with_mean:
                total[rows] += z.sum(1)
            if teacher is not None:
                t = teacher.tile(rows, cols, dtype)
                q = torch.exp(t - teacher_lse[rows].unsqueeze(1))
                q_gap[rows] += (t.sub_(z).mul_(q)).sum(1)
            if plan.with_entropy:
                tile_lse = torch.logsumexp(z, 1)
                new_lse = torch.logaddexp(run_lse, tile_lse)
                neg_entropy[rows] = _fold_entropy(neg_entropy[rows], run_lse, z, tile_lse, new_lse)
            else:
                new_lse = torch.logaddexp(run_lse, tile_logsumexp_(z))
            run_lse = new_lse
        lse[rows] = run_lse

    mean = total / plan.vocab_size
    entropy = -neg_entropy
    kl = q_gap + lse - teacher_lse if teacher is not None else q_gap
    return lse, target, mean, entropy, kl, teacher_lse


def _fold_entropy(acc: Tensor, run_lse: Tensor, z: Tensor, tile_lse: Tensor, new_lse: Tensor) -> Tensor:
    """Add one tile to `acc = sum_v p_v log p_v` while the normaliser moves from `run_lse` to `new_lse`.

    Kept as a sum of small terms (log-probs within the tile, plus lse differences) rather than
    `lse - sum_v p_v z_v`, which cancels catastrophically for low-entropy tokens.
    """
    log_q = z - tile_lse.unsqueeze(1)  # log-softmax within the tile
    tile_term = (log_q.exp() * log_q).sum(1) + (tile_lse - new_lse)
    shift = run_lse - new_lse
    # tiles seen before: each p_v shrinks by exp(shift) and each log p_v moves by shift
    old = torch.where(torch.isneginf(run_lse), 0.0, torch.exp(shift) * (acc + shift))
    return old + torch.exp(tile_lse - new_lse) * tile_term


def _backward(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    lse: Tensor,
    entropy: Tensor,
    teacher_lse: Tensor,
    plan: Plan,
    teacher: Teacher | None,
    grads: tuple[Tensor | None, ...],
    need_hidden: bool,
    need_weight: bool,
) -> tuple[Tensor | None, Tensor | None]:
    n, dtype = hidden.shape[0], plan.compute_dtype

    # Per-token coefficients of d(statistic)/dz, with the chain rule through `scale` folded in.
    def coef(g: Tensor | None) -> Tensor | None:
        return None if g is None else (g.float() * plan.scale).unsqueeze(1)

    c_lse, c_target, c_mean, c_entropy, c_kl = (coef(g) for g in grads)
    # d lse/dz = p and d kl/dz = p - q share the p term
    c_p = c_lse if c_kl is None else (c_kl if c_lse is None else c_lse + c_kl)
    if c_mean is not None:
        c_mean = c_mean / plan.vocab_size

    grad_h = torch.zeros(hidden.shape, device=hidden.device, dtype=torch.float32) if need_hidden else None
    grad_w = torch.zeros_like(weight) if need_weight else None  # padded rows keep a zero gradient
    several = n > plan.chunk_size
    for cols in _spans(plan.vocab_size, plan.vocab_chunk_size):
        w = weight[cols].to(dtype)
        acc_w = torch.zeros(w.shape, device=w.device, dtype=torch.float32) if need_weight and several else None
        for rows in _spans(n, plan.chunk_size):
            h = hidden[rows].to(dtype)
            log_p = _logits(h, w, plan.scale).sub_(lse[rows].unsqueeze(1))
            if c_entropy is None:
                gz = log_p.exp_()
                gz = gz.mul_(c_p[rows]) if c_p is not None else gz.zero_()
            else:  # d H/dz = -p (log p + H)
                p = log_p.exp()
                gz = log_p.add_(entropy[rows].unsqueeze(1)).mul_(-c_entropy[rows])
                gz = (gz.add_(c_p[rows]) if c_p is not None else gz).mul_(p)
                del p
            if c_mean is not None:
                gz.add_(c_mean[rows])
            if c_kl is not None:
                assert teacher is not None
                q = teacher.tile(rows, cols, dtype).sub_(teacher_lse[rows].unsqueeze(1)).exp_()
                gz.sub_(q.mul_(c_kl[rows]))
                del q
            if c_target is not None:
                local, inside = _target_in_tile(targets[rows], cols)
                bump = torch.where(inside.unsqueeze(1), c_target[rows], 0.0)
                gz.scatter_add_(1, local.unsqueeze(1), bump)
            gz = gz.to(dtype)
            if grad_h is not None:
                _add_mm(grad_h[rows], gz, w)
            if acc_w is not None:
                _add_mm(acc_w, gz.t(), h)
            elif grad_w is not None:
                grad_w[cols] = torch.mm(gz.t(), h)
        if acc_w is not None:
            assert grad_w is not None
            grad_w[cols] = acc_w
    return (grad_h.to(hidden.dtype) if grad_h is not None else None), grad_w
