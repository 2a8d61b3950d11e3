"""The clipped policy-gradient loss over sampled tokens, its corrections and its metrics.

All inputs are flat `[N]` tensors over the scored (sampled) tokens of a micro-batch, with `doc [N]`
naming each token's sequence (`0..num_docs-1`):

    logprobs   the trainer's log-probs now (with gradients), at the sampling temperature
    old        the trainer's log-probs before this rollout's first update (no gradient); the
               ratio pi / pi_old is 1 in value on a fully on-policy step
    rollout    the engine's log-probs of the same tokens, under the distribution it sampled from
    advantages each token's (sequence) advantage
    ref        a frozen reference's log-probs (only when `beta > 0`)

Loss per token: `max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high))` (PPO with DAPO's separate
bounds), `r = exp(logprobs - old)` per token (`ppo`) or the sequence's geometric-mean ratio
(`gspo`), times the importance correction between trainer and engine (`tis`: `min(w, cap)`;
`mis`: `w`, and 0 where `w > cap`; `w = exp(old - rollout)` per token or per sequence), plus
`beta * KL(pi || ref)` (`k1` or `k3` estimator). Aggregation over the global batch:
`token_mean` (sum / tokens), `seq_mean_token_mean` (mean over sequences of each one's token mean),
`seq_mean_token_sum` (mean over sequences of each one's token sum).

Precision metrics compare the trainer (`old`) with the engine (`rollout`): `d = old - rollout`;
`mismatch/kl_k3` is the k3 estimate of KL(engine || trainer) (`exp(d) - 1 - d`), plus mean and max
`|d|`, the share of tokens whose ratio `exp(d)` is outside [0.5, 2], and the mean over sequences of
each one's largest `|d|`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum")
LN2 = math.log(2.0)


@dataclass(frozen=True)
class PolicyLossSettings:
    loss: str = "ppo"  # ppo | gspo
    clip_low: float = 0.2
    clip_high: float = 0.2
    aggregation: str = "token_mean"
    beta: float = 0.0
    kl: str = "k3"  # k1 | k3
    correction: str = "none"  # none | tis | mis
    correction_level: str = "token"  # token | sequence
    correction_cap: float = 2.0

    @property
    def normaliser(self) -> str:
        return "tokens" if self.aggregation == "token_mean" else "sequences"


@dataclass
class PolicyTokens:
    logprobs: Tensor
    old: Tensor
    rollout: Tensor
    advantages: Tensor
    doc: Tensor
    num_docs: int
    entropy: Tensor | None = None
    ref: Tensor | None = None


def segment_sum(values: Tensor, doc: Tensor, num_docs: int) -> Tensor:
    return torch.zeros(num_docs, dtype=values.dtype, device=values.device).index_add(0, doc, values)


def segment_count(doc: Tensor, num_docs: int) -> Tensor:
    return torch.bincount(doc, minlength=num_docs).to(torch.float32)


def log_ratio(t: PolicyTokens, loss: str) -> Tensor:
    """Per-token log importance ratio pi / pi_old: the token's own (`ppo`) or its sequence's mean
    (`gspo`, gradients through every token of the sequence)."""
    diff = t.logprobs - t.old
    if loss == "ppo":
        return diff
    if loss == "gspo":
        mean = segment_sum(diff, t.doc, t.num_docs) / segment_count(t.doc, t.num_docs).clamp(min=1)
        return mean[t.doc]
    raise ValueError(f"unknown policy loss {loss!r}; expected ppo or gspo")


def correction_weights(t: PolicyTokens, s: PolicyLossSettings) -> tuple[Tensor, Tensor]:
    """(`[N]` weights, `[N]` bool: token left out or capped) of the trainer/engine correction."""
    log_w = t.old - t.rollout
    if s.correction_level == "sequence":
        log_w = segment_sum(log_w, t.doc, t.num_docs)[t.doc]
    w = torch.exp(log_w)
    if s.correction == "tis":
        return w.clamp(max=s.correction_cap), w > s.correction_cap
    if s.correction == "mis":
        over = w > s.correction_cap
        return torch.where(over, torch.zeros_like(w), w), over
    raise ValueError(f"unknown correction {s.correction!r}; expected none, tis or mis")


def kl_estimate(logprobs: Tensor, ref: Tensor, kind: str) -> Tensor:
    """Per-token estimate of KL(pi || ref) from tokens sampled from pi."""
    if kind == "k1":
        return logprobs - ref
    if kind == "k3":
        delta = ref - logprobs
        return torch.exp(delta) - delta - 1
    raise ValueError(f"unknown KL estimator {kind!r}; expected k1 or k3")


def aggregate(values: Tensor, t: PolicyTokens, aggregation: str, normaliser: int) -> Tensor:
    """This micro-batch's share of the global aggregate (`normaliser`: global tokens or sequences)."""
    if aggregation == "token_mean":
        return values.sum() / normaliser
    sums = segment_sum(values, t.doc, t.num_docs)
    if aggregation == "seq_mean_token_mean":
        sums = sums / segment_count(t.doc, t.num_docs).clamp(min=1)
    elif aggregation != "seq_mean_token_sum":
        raise ValueError(f"unknown aggregation {aggregation!r}; expected one of {AGGREGATIONS}")
    return sums.sum() / normaliser


def policy_loss(t: PolicyTokens, s: PolicyLossSettings, normaliser: int) -> tuple[Tensor, dict, dict]:
    """(loss share, metrics as (sum, count), maxima) for one micro-batch; see the module doc."""
    ratio = torch.exp(log_ratio(t, s.loss))
    adv = t.advantages
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - s.clip_low, 1.0 + s.clip_high)
    per_token = torch.maximum(unclipped, clipped)
    n = t.logprobs.numel()
    metrics: dict = {
        "ratio/mean": (ratio.detach().sum(), n),
        "clip/low_fraction": (((ratio < 1.0 - s.clip_low) & (adv < 0)).sum(), n),
        "clip/high_fraction": (((ratio > 1.0 + s.clip_high) & (adv > 0)).sum(), n),
        "advantage/mean": (adv.sum(), n),
    }
    if s.correction != "none":
        weights, flagged = correction_weights(t, s)
        per_token = per_token * weights.detach()
        metrics["correction/weight_mean"] = (weights.sum(), n)
        metrics["correction/masked_fraction" if s.correction == "mis" else "correction/capped_fraction"] = (
            flagged.sum(), n)
    if s.beta > 0:
        assert t.ref is not None, "beta > 0 needs reference log-probs"
        kl = kl_estimate(t.logprobs, t.ref, s.kl)
        per_token = per_token + s.beta * kl
        metrics["kl"] = (kl.detach().sum(), n)
    if t.entropy is not None:
        metrics["entropy"] = (t.entropy.detach().sum(), n)
    mismatch, maxima = mismatch_metrics(t)
    metrics.update(mismatch)
    return aggregate(per_token, t, s.aggregation, normaliser), metrics, maxima


@torch.no_grad()
def mismatch_metrics(t: PolicyTokens) -> tuple[dict, dict]:
    """Trainer-vs-engine log-prob agreement on the sampled tokens (see the module doc)."""
    d = (t.old - t.rollout).double()
    gap = d.abs()
    n = d.numel()
    per_seq_max = torch.zeros(t.num_docs, dtype=d.dtype, device=d.device).scatter_reduce(
        0, t.doc, gap, reduce="amax", include_self=True)
    seqs = int((segment_count(t.doc, t.num_docs) > 0).sum())
    metrics = {
        "mismatch/kl_k3": ((torch.exp(d) - 1 - d).sum(), n),
        "mismatch/abs_logprob_diff": (gap.sum(), n),
        "mismatch/ratio_outside_0.5_2": ((gap > LN2).sum(), n),
        "mismatch/seq_max_abs_logprob_diff": (per_seq_max.sum(), seqs),
    }
    maxima = {"mismatch/max_abs_logprob_diff": gap.max() if n else torch.zeros((), dtype=d.dtype)}
    return metrics, maxima
