"""Distillation losses through the LM head: forward KL, reverse KL and generalised JSD, mixed with
the cross-entropy on the data's labels, in one pass over each model's head.

    out = linear_distill(hidden, weight, labels, teacher_hidden=..., teacher_weight=...,
                         loss=DistillLoss("jsd", beta=0.5, temperature=2.0, kd_weight=0.9), num_valid=n)
    out.loss.backward()        # kd_weight * T^2 * mean divergence + (1 - kd_weight) * mean CE

The teacher is either live (its final hidden states and head: its logits are produced tile by
tile like the student's) or a top-k table (`TopK`: per trained token the teacher's k most likely
ids, their log-probs at the distillation temperature, and the log-prob of everything else).

How the top-k loss treats the rest of the vocabulary: the divergence is taken between two
distributions over k + 1 outcomes, the teacher's k tokens and one "tail" bucket holding every
other token. The student's tail probability is its exact softmax mass outside the k ids (a
log-sum-exp over the other logits, not `1 - sum`), the teacher's is stored by the pass that wrote
the table. With k equal to the vocabulary this is the full-vocabulary divergence; with k small
it is a lower bound of it (merging outcomes never increases a divergence), and the student is
still pushed to put on the tail exactly the mass the teacher did. Bucket log-probabilities are
floored at `LOG_FLOOR` (e^-100) so that a tail that underflowed in one model stays finite.

Gradients are computed in the forward (the loss is a scalar with per-token coefficients known up
front), so each token chunk costs three student GEMMs (logits, grad_hidden, grad_weight) and one
teacher GEMM, the least any exact method needs. The price is the cached logits of one token chunk
for the whole vocabulary (both models, capped at `grads_in_forward.MAX_CACHED_LOGITS_BYTES` by shrinking the
chunk) and an fp32 `[V, d]` buffer for grad_weight. The full `[tokens, vocab]` logits never exist.

Gradient of every divergence D with respect to the student's scaled logit z_v (z / T) has one
shape: dD/dz_v = p_v (a_b(v)), with b(v) the outcome holding v and
    forward KL(q||p):  a = 1 - q / p
    reverse KL(p||q):  a = log p - log q - D
    JSD_beta:          a = (1 - beta) (log p - log m - KL(p||m)),  m = beta q + (1 - beta) p
which is what the gradient pass applies tile by tile.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from posttrain.ops.grads_in_forward import add_tile_grads, cached_chunk_size
from posttrain.ops.head_stats import Plan, _spans, _target_in_tile
from posttrain.ops.inputs import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_VOCAB_CHUNK_SIZE,
    check_chunks,
    check_head,
    denominator,
    select,
)

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
LOG_FLOOR = -100.0


@dataclass(frozen=True)
class DistillLoss:
    """What is minimised: `kd_weight * T^2 * divergence + (1 - kd_weight) * CE`, per trained token."""

    divergence: str = "forward_kl"  # forward_kl: KL(teacher || student); reverse_kl; jsd
    beta: float = 0.5  # jsd only: m = beta * teacher + (1 - beta) * student, in (0, 1)
    temperature: float = 1.0  # both distributions at z / T; the CE term stays at T = 1
    kd_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"divergence must be one of {', '.join(DIVERGENCES)}, got {self.divergence!r}")
        if self.divergence == "jsd" and not 0.0 < self.beta < 1.0:
            raise ValueError(f"jsd needs 0 < beta < 1 (beta -> 0 and 1 are forward_kl / reverse_kl), got {self.beta}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.kd_weight <= 1.0:
            raise ValueError(f"kd_weight must be in [0, 1], got {self.kd_weight}")


@dataclass(frozen=True)
class TopK:
    """The teacher's top-k per trained token, rows in the order of the trained labels (row-major)."""

    ids: Tensor  # [n, k] int64 token ids
    logprobs: Tensor  # [n, k] log-probs at the distillation temperature
    tail: Tensor  # [n] log-prob of every other token together


@dataclass
class DistillOutput:
    """`loss` carries the gradient; the per-trained-token statistics `[n]` are fp32 and detached."""

    loss: Tensor
    divergence: Tensor  # before the T^2 and kd_weight factors
    ce: Tensor  # student cross-entropy on the label, at T = 1
    teacher_ce: Tensor | None  # live teacher only
    agree: Tensor  # 1 where the student's and the teacher's most likely tokens are the same


def linear_distill(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    teacher_hidden: Tensor | None = None,
    teacher_weight: Tensor | None = None,
    teacher_topk: TopK | None = None,
    loss: DistillLoss = DistillLoss(),
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    vocab_chunk_size: int = DEFAULT_VOCAB_CHUNK_SIZE,
    ignore_index: int = -100,
    num_valid: int | float | Tensor | None = None,
    vocab_size: int | None = None,
    matmul_dtype: torch.dtype | None = None,
) -> DistillOutput:
    """Distillation loss of the student head `hidden @ weight.T` on the trained labels.

    `hidden`, `weight`, `labels`, `vocab_size`, `num_valid` and the tiles are as in
    `linear_cross_entropy` (the loss is the sum over trained tokens divided by `num_valid`).
    The teacher is `teacher_hidden` (`[*labels.shape, d_t]`, its final hidden states) with
    `teacher_weight` (`[>=vocab_size, d_t]`), or `teacher_topk` (one row per trained label).
    Both models must share the first `vocab_size` tokens. No gradient reaches the teacher.
    """
    check_chunks(chunk_size, vocab_chunk_size)
    sel = select(hidden, weight, labels, ignore_index=ignore_index, vocab_size=vocab_size, matmul_dtype=matmul_dtype)
    teacher = _teacher_rows(sel, labels, teacher_hidden, teacher_weight, teacher_topk)
    plan = Plan(vocab_size=sel.vocab_size, chunk_size=chunk_size, vocab_chunk_size=vocab_chunk_size,
                compute_dtype=sel.compute_dtype, scale=1.0 / loss.temperature)
    outputs = _Distill.apply(sel.hidden, weight, sel.targets, plan, loss, teacher,
                             denominator(sel, "mean", num_valid))
    total, divergence, ce, teacher_ce, agree = outputs
    return DistillOutput(total, divergence, ce, teacher_ce if teacher_ce.numel() else None, agree)


@dataclass(frozen=True)
class _Teacher:
    hidden: Tensor | None = None  # [n, d_t] rows of the trained tokens
    weight: Tensor | None = None
    topk: TopK | None = None


def _teacher_rows(sel, labels: Tensor, hidden: Tensor | None, weight: Tensor | None, topk: TopK | None) -> _Teacher:
    if (topk is None) == (hidden is None and weight is None):
        raise ValueError("pass either teacher_hidden with teacher_weight, or teacher_topk")
    if topk is not None:
        n = sel.count
        if topk.ids.dim() != 2 or topk.ids.shape[0] != n or topk.logprobs.shape != topk.ids.shape \
                or topk.tail.shape != (n,):
            raise ValueError(f"teacher_topk must be ids and logprobs [{n}, k] and tail [{n}] (one row per "
                             f"trained label); got {tuple(topk.ids.shape)}, {tuple(topk.logprobs.shape)}, "
                             f"{tuple(topk.tail.shape)}")
        if topk.ids.numel() and (int(topk.ids.min()) < 0 or int(topk.ids.max()) >= sel.vocab_size):
            raise ValueError(f"teacher_topk ids must lie in [0, {sel.vocab_size})")
        device = sel.targets.device
        return _Teacher(topk=TopK(topk.ids.to(device).long(), topk.logprobs.to(device).float(),
                                  topk.tail.to(device).float()))
    if hidden is None or weight is None:
        raise ValueError("teacher_hidden and teacher_weight go together")
    vocab = check_head(hidden, weight, None, role="teacher_")
    if hidden.shape[:-1] != labels.shape or vocab < sel.vocab_size:
        raise ValueError(f"teacher_hidden {tuple(hidden.shape)} must be [*labels.shape, d] and teacher_weight "
                         f"{tuple(weight.shape)} must have >= {sel.vocab_size} rows (labels {tuple(labels.shape)})")
    rows = hidden.detach().reshape(-1, hidden.shape[-1]).index_select(0, sel.index)
    return _Teacher(hidden=rows, weight=weight.detach())


class _Distill(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, plan, loss, teacher, denom):  # type: ignore[override]
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        with torch.autocast(hidden.device.type, enabled=False):
            total, stats, grad_hidden, grad_weight = _run(hidden, weight, targets, plan, loss, teacher, denom,
                                                          need_hidden, need_weight)
        # Kept as plain attributes, not saved tensors: the backward hands them over scaled in place,
        # so autograd can take them as the gradients without another [V, d] copy.
        ctx.grads = [grad_hidden, grad_weight]
        ctx.mark_non_differentiable(*stats)
        return (total, *stats)

    @staticmethod
    def backward(ctx, grad: Tensor, *_unused):  # type: ignore[override]
        if ctx.grads is None:
            raise RuntimeError("linear_distill's gradients were computed in its forward and handed over once; "
                               "backward through it twice is not supported")
        grad_hidden, grad_weight = ctx.grads
        ctx.grads = None

        def scaled(g: Tensor | None) -> Tensor | None:
            return None if g is None else g.mul_(grad.to(g.dtype))

        return scaled(grad_hidden), scaled(grad_weight), None, None, None, None, None


def _run(hidden, weight, targets, plan: Plan, loss: DistillLoss, teacher: _Teacher, denom: Tensor,
         need_hidden: bool, need_weight: bool):
    n, device = hidden.shape[0], hidden.device
    inv = 1.0 / denom.to(device=device, dtype=torch.float32)
    chunk = cached_chunk_size(plan, models=2 if teacher.hidden is not None else 1)
    several = n > chunk
    grad_h = torch.zeros(hidden.shape, device=device, dtype=torch.float32) if need_hidden else None
    grad_w = torch.zeros(weight.shape, device=device, dtype=torch.float32 if several else weight.dtype) \
        if need_weight else None
    coef_ce = (1.0 - loss.kd_weight) * inv
    coef_kd = loss.kd_weight * loss.temperature**2 * inv * plan.scale  # d(z/T)/dz folded in
    stats = [torch.zeros(n, device=device) for _ in range(3)]  # divergence, ce, agree
    teacher_ce = torch.zeros(n if teacher.hidden is not None else 0, device=device)
    for rows in _spans(n, chunk):
        h = hidden[rows].to(plan.compute_dtype)
        tiles = _head_tiles(h, weight, plan)
        student = _Stats.of(tiles, targets[rows], plan)
        if teacher.hidden is not None:
            t_tiles = _head_tiles(teacher.hidden[rows].to(plan.compute_dtype), teacher.weight, plan)
            teach = _Stats.of(t_tiles, targets[rows], plan)
            teacher_ce[rows] = teach.lse1 - teach.target
            agree = student.argmax == teach.argmax
            div, shift = _full_divergence(tiles, t_tiles, student, teach, plan, loss)
            kd = _FullGradient(t_tiles, teach, shift, loss)
        else:
            part = TopK(teacher.topk.ids[rows], teacher.topk.logprobs[rows], teacher.topk.tail[rows])
            log_p, log_q = _buckets(tiles, student, part, plan)
            div, a = _bucket_divergence(log_p, log_q, loss)
            agree = student.argmax == part.ids.gather(1, part.logprobs.argmax(1, keepdim=True)).squeeze(1)
            kd = _TopKGradient(part.ids, log_p[:, :-1].exp(), a)
        stats[0][rows], stats[1][rows], stats[2][rows] = div, student.lse1 - student.target, agree.float()
        for j, (cols, raw) in enumerate(tiles):
            gz = _tile_gradient(raw, cols, j, targets[rows], student, kd, plan, coef_ce, coef_kd, loss.kd_weight)
            add_tile_grads(gz, h, weight[cols].to(plan.compute_dtype), grad_h, grad_w, rows, cols, several)
    total = (loss.kd_weight * loss.temperature**2 * stats[0].sum() + (1.0 - loss.kd_weight) * stats[1].sum()) * inv
    return (total, (stats[0], stats[1], teacher_ce, stats[2]),
            grad_h.to(hidden.dtype) if grad_h is not None else None,
            grad_w.to(weight.dtype) if grad_w is not None else None)


def _head_tiles(h: Tensor, weight: Tensor, plan: Plan) -> list[tuple[slice, Tensor]]:
    """One token chunk's logits for the whole vocabulary, as GEMM-dtype tiles."""
    return [(cols, torch.mm(h, weight[cols].to(plan.compute_dtype).t()))
            for cols in _spans(plan.vocab_size, plan.vocab_chunk_size)]


def _scaled(raw: Tensor, plan: Plan) -> Tensor:
    """fp32 z / T of a tile, always a fresh tensor."""
    z = raw.float()
    if plan.scale != 1.0:
        return z * plan.scale
    return z.clone() if z is raw else z


@dataclass
class _Stats:
    """One model's per-token softmax statistics over a chunk's tiles."""

    lse1: Tensor  # log-sum-exp of the logits (T = 1)
    lse: Tensor  # log-sum-exp of z / T
    target: Tensor  # logit of the label (T = 1)
    argmax: Tensor

    @classmethod
    def of(cls, tiles: list[tuple[slice, Tensor]], targets: Tensor, plan: Plan) -> _Stats:
        c, device = targets.shape[0], targets.device
        lse1 = torch.full((c,), float("-inf"), device=device)
        lse = lse1.clone() if plan.scale != 1.0 else lse1
        target, best = torch.zeros(c, device=device), torch.full((c,), float("-inf"), device=device)
        argmax = torch.zeros(c, dtype=torch.long, device=device)
        for cols, raw in tiles:
            z = raw.float()
            local, inside = _target_in_tile(targets, cols)
            target = torch.where(inside, z.gather(1, local.unsqueeze(1)).squeeze(1), target)
            top, where = z.max(1)
            better = top > best
            best, argmax = torch.where(better, top, best), torch.where(better, where + cols.start, argmax)
            tile_lse = torch.logsumexp(z, 1)
            if plan.scale != 1.0:
                lse = torch.logaddexp(lse, torch.logsumexp(z * plan.scale, 1))
            lse1 = torch.logaddexp(lse1, tile_lse)
        return cls(lse1, lse if plan.scale != 1.0 else lse1, target, argmax)


def _log_probs(raw: Tensor, stats: _Stats, plan: Plan) -> Tensor:
    return _scaled(raw, plan).sub_(stats.lse.unsqueeze(1))


def _full_divergence(tiles, t_tiles, student: _Stats, teacher: _Stats, plan: Plan,
                     loss: DistillLoss) -> tuple[Tensor, Tensor]:
    """Per-token divergence over the whole vocabulary, and the shift its gradient subtracts
    (reverse KL: D; JSD: KL(p||m); forward KL: none)."""
    div = torch.zeros_like(student.lse)
    kl_pm = torch.zeros_like(student.lse)
    for (_, raw), (_, t_raw) in zip(tiles, t_tiles):
        tile_div, tile_kl_pm = _divergence_sums(_log_probs(raw, student, plan), _log_probs(t_raw, teacher, plan), loss)
        div += tile_div
        kl_pm += tile_kl_pm
    return div, (div if loss.divergence == "reverse_kl" else kl_pm)


def _divergence_sums(log_p: Tensor, log_q: Tensor, loss: DistillLoss) -> tuple[Tensor, Tensor]:
    """Row sums over these outcomes of the divergence's terms, and of KL(p||m) (JSD only, else 0)."""
    if loss.divergence == "forward_kl":
        return (log_q.exp() * (log_q - log_p)).sum(1), torch.zeros_like(log_p[:, 0])
    if loss.divergence == "reverse_kl":
        return (log_p.exp() * (log_p - log_q)).sum(1), torch.zeros_like(log_p[:, 0])
    log_m = _log_mixture(log_p, log_q, loss.beta)
    kl_pm = (log_p.exp() * (log_p - log_m)).sum(1)
    return loss.beta * (log_q.exp() * (log_q - log_m)).sum(1) + (1.0 - loss.beta) * kl_pm, kl_pm


def _log_mixture(log_p: Tensor, log_q: Tensor, beta: float) -> Tensor:
    return torch.logaddexp(log_p + math.log(1.0 - beta), log_q + math.log(beta))


def _buckets(tiles, student: _Stats, topk: TopK, plan: Plan) -> tuple[Tensor, Tensor]:
    """Student and teacher log-probs over the k + 1 outcomes (top-k ids, then the tail)."""
    c, k = topk.ids.shape
    picked = torch.zeros(c, k, device=topk.ids.device)
    tail = torch.full((c,), float("-inf"), device=topk.ids.device)
    for cols, raw in tiles:
        z = _scaled(raw, plan)
        local, inside = _target_in_tile(topk.ids, cols)
        picked = torch.where(inside, z.gather(1, local), picked)
        tail = torch.logaddexp(tail, logsumexp_without_(z, topk.ids, cols))
    log_p = torch.cat([picked, tail.unsqueeze(1)], 1) - student.lse.unsqueeze(1)
    log_q = torch.cat([topk.logprobs, topk.tail.unsqueeze(1)], 1)
    return log_p.clamp(min=LOG_FLOOR), log_q.clamp(min=LOG_FLOOR)


def logsumexp_without_(z: Tensor, ids: Tensor, cols: slice) -> Tensor:
    """Row-wise log-sum-exp of the tile `z` (columns `cols` of the vocabulary) leaving out the
    tokens `ids [c, k]`; overwrites `z`. Ids outside the tile are clamped onto its edges by
    `_target_in_tile`, so hits are counted rather than flags scattered."""
    local, inside = _target_in_tile(ids, cols)
    hits = torch.zeros_like(z).scatter_add_(1, local, inside.float())
    return torch.logsumexp(z.masked_fill_(hits > 0, float("-inf")), 1)


def _bucket_divergence(log_p: Tensor, log_q: Tensor, loss: DistillLoss) -> tuple[Tensor, Tensor]:
    """Divergence over the buckets and its gradient coefficient `a` per bucket (`[c, k + 1]`)."""
    div, kl_pm = _divergence_sums(log_p, log_q, loss)
    if loss.divergence == "forward_kl":
        return div, 1.0 - (log_q - log_p).exp()
    if loss.divergence == "reverse_kl":
        return div, log_p - log_q - div.unsqueeze(1)
    log_m = _log_mixture(log_p, log_q, loss.beta)
    return div, (1.0 - loss.beta) * (log_p - log_m - kl_pm.unsqueeze(1))


@dataclass
class _FullGradient:
    t_tiles: list[tuple[slice, Tensor]]
    teacher: _Stats
    shift: Tensor
    loss: DistillLoss


@dataclass
class _TopKGradient:
    ids: Tensor  # [c, k]
    picked_p: Tensor  # [c, k] student probabilities of the top-k ids (at T)
    a: Tensor  # [c, k + 1] gradient coefficients per bucket, the tail last


def _tile_gradient(raw: Tensor, cols: slice, j: int, targets: Tensor, student: _Stats,
                   kd: _FullGradient | _TopKGradient, plan: Plan, coef_ce: Tensor, coef_kd: Tensor,
                   kd_weight: float) -> Tensor:
    """d loss / d logits of one tile, in the GEMM dtype."""
    if kd_weight != 1.0:
        gz = raw.float().sub(student.lse1.unsqueeze(1)).exp_().mul_(coef_ce)
        local, inside = _target_in_tile(targets, cols)
        gz.scatter_add_(1, local.unsqueeze(1), torch.where(inside, -coef_ce, 0.0).unsqueeze(1))
    else:
        gz = torch.zeros(raw.shape, device=raw.device)
    if kd_weight == 0.0:
        return gz.to(plan.compute_dtype)
    log_p = _log_probs(raw, student, plan)
    if isinstance(kd, _TopKGradient):
        p = log_p.exp_()
        gz.add_(p * kd.a[:, -1:] * coef_kd)
        local, inside = _target_in_tile(kd.ids, cols)
        extra = kd.picked_p * (kd.a[:, :-1] - kd.a[:, -1:]) * coef_kd
        gz.scatter_add_(1, local, torch.where(inside, extra, 0.0))
        return gz.to(plan.compute_dtype)
    log_q = _log_probs(kd.t_tiles[j][1], kd.teacher, plan)
    if kd.loss.divergence == "forward_kl":
        term = log_p.exp() - log_q.exp_()
    elif kd.loss.divergence == "reverse_kl":
        term = log_p.exp() * (log_p - log_q - kd.shift.unsqueeze(1))
    else:
        log_m = _log_mixture(log_p, log_q, kd.loss.beta)
        term = (1.0 - kd.loss.beta) * log_p.exp() * (log_p - log_m - kd.shift.unsqueeze(1))
    return gz.add_(term.mul_(coef_kd)).to(plan.compute_dtype)
