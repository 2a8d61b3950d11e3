"""Preference optimisation: DPO and its relatives as one objective over packed pairs.

A batch holds pairs as adjacent documents, chosen then rejected, with a shared group id (the data
layer keeps a pair in one row). Per document the objective sums the policy's log-probs of the
scored tokens (the final reply) from `ops.linear_logprobs`, never a `[tokens, vocab]` tensor, and
compares chosen with rejected:

    delta  = (logp_c - ref_c) - (logp_r - ref_r)             the implicit reward margin / beta
    sigmoid  -(1-e) log s(b delta) - e log s(-b delta)         DPO (e > 0: conservative DPO)
    robust   (-(1-e) log s(b delta) + e log s(-b delta)) / (1 - 2e)   unbiased under label noise
    hinge    relu(1 - b delta)                                 SLiC
    ipo      (delta_avg - 1 / (2b))^2, delta_avg with each log-ratio divided by its reply's length
    simpo    -(1-e) log s(b m - g) - e log s(g - b m), m = logp_c/len_c - logp_r/len_r, no reference

plus `sft_weight` x the chosen replies' cross-entropy (a mean over chosen tokens, RPO-style).
The reference's log-probs arrive as the per-token batch field `ref_logprobs`, whose per-document
sum is the reference sequence log-prob (a live frozen pass writes every token; a precomputed
cache writes each document's sum on its first scored token).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from posttrain.data.batch import IGNORE_INDEX, PackedBatch
from posttrain.ops import linear_logprobs
from posttrain.train.objective import Normaliser, Objective, ObjectiveOutput
from posttrain.train.objectives import forward_hidden

LOSSES = ("sigmoid", "robust", "hinge", "ipo", "simpo")
REFERENCE_FREE = ("simpo",)


@dataclass(frozen=True)
class PreferenceLoss:
    loss: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    gamma: float = 0.5  # simpo's target margin (in reward units)
    sft_weight: float = 0.0

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"unknown preference loss {self.loss!r}; expected one of {', '.join(LOSSES)}")


@dataclass
class PairLogps:
    """Per pair: summed log-probs of the scored tokens and their counts, chosen and rejected."""

    chosen: Tensor
    rejected: Tensor
    chosen_tokens: Tensor
    rejected_tokens: Tensor


def document_sums(values: Tensor, batch: PackedBatch) -> tuple[Tensor, Tensor]:
    """(sum of `values` over each document's scored tokens, their count), both `[num_documents]`."""
    docs = batch.document_ids.flatten()
    scored = (batch.labels.flatten() != IGNORE_INDEX) & (docs >= 0)
    index = docs[scored]
    sums = values.new_zeros(batch.num_documents).index_add(0, index, values.flatten()[scored])
    counts = torch.zeros(batch.num_documents, dtype=values.dtype, device=values.device)
    counts = counts.index_add(0, index, torch.ones_like(index, dtype=values.dtype))
    return sums, counts


def check_pairs(batch: PackedBatch) -> None:
    """A batch of whole pairs: the two documents of a pair adjacent (chosen first), one group id."""
    groups = batch.groups
    if (groups is None or batch.num_documents % 2 or bool((groups < 0).any())
            or not torch.equal(groups[0::2], groups[1::2])):
        shown = None if groups is None else groups.tolist()[:8]
        raise ValueError("a preference objective needs batches of pairs (data.task: preference): "
                         f"documents of one pair adjacent, chosen first; got groups {shown}")


def pair_up(per_doc: Tensor, counts: Tensor, batch: PackedBatch) -> PairLogps:
    """Split per-document values into chosen (even documents) and rejected (odd ones)."""
    check_pairs(batch)
    return PairLogps(per_doc[0::2], per_doc[1::2], counts[0::2], counts[1::2])


def preference_losses(cfg: PreferenceLoss, policy: PairLogps, reference: PairLogps | None) -> tuple[Tensor, Tensor, Tensor]:
    """(per-pair loss, chosen rewards, rejected rewards) for `cfg.loss`; rewards are detached."""
    b, e = cfg.beta, cfg.label_smoothing
    if cfg.loss == "simpo":
        chosen = policy.chosen / policy.chosen_tokens.clamp(min=1)
        rejected = policy.rejected / policy.rejected_tokens.clamp(min=1)
        x = b * (chosen - rejected) - cfg.gamma
        loss = -(1 - e) * F.logsigmoid(x) - e * F.logsigmoid(-x)
        return loss, (b * chosen).detach(), (b * rejected).detach()
    assert reference is not None, f"{cfg.loss} needs reference log-probs"
    chosen = policy.chosen - reference.chosen
    rejected = policy.rejected - reference.rejected
    delta = chosen - rejected
    if cfg.loss == "sigmoid":
        loss = -(1 - e) * F.logsigmoid(b * delta) - e * F.logsigmoid(-b * delta)
    elif cfg.loss == "robust":
        loss = (-(1 - e) * F.logsigmoid(b * delta) + e * F.logsigmoid(-b * delta)) / (1 - 2 * e)
    elif cfg.loss == "hinge":
        loss = torch.relu(1 - b * delta)
    else:  # ipo, with each log-ratio averaged over its reply's tokens
        avg = chosen / policy.chosen_tokens.clamp(min=1) - rejected / policy.rejected_tokens.clamp(min=1)
        loss = (avg - 1 / (2 * b)) ** 2
    return loss, (b * chosen).detach(), (b * rejected).detach()


class PreferenceObjective(Objective):
    """The preference loss averaged over pairs (all micro-batches and ranks), with TRL's metrics.

    `reference` turns a batch into its `ref_logprobs` field (a live frozen pass or a cache
    lookup); None for reference-free losses.
    """

    name = "preference"
    normaliser = "pairs"

    def __init__(self, cfg: PreferenceLoss, reference=None, *, chunk_size: int, vocab_chunk_size: int):
        if (reference is None) != (cfg.loss in REFERENCE_FREE):
            raise ValueError(f"loss {cfg.loss!r} {'needs' if reference is None else 'takes no'} reference log-probs")
        self.cfg, self.reference = cfg, reference
        self.chunk_size, self.vocab_chunk_size = chunk_size, vocab_chunk_size
        self.required_fields = frozenset() if reference is None else frozenset({"ref_logprobs"})
        self.frozen_forwards = getattr(reference, "frozen_forwards", 0)

    def prepare(self, batch: PackedBatch) -> PackedBatch:
        return batch if self.reference is None else self.reference(batch)

    def extra_counts(self, batch: PackedBatch) -> dict[str, int]:
        if not self.cfg.sft_weight:
            return {}
        scored = (batch.labels != IGNORE_INDEX) & (batch.document_ids >= 0) & (batch.document_ids % 2 == 0)
        return {"chosen_tokens": int(scored.sum())}

    def compute(self, model: nn.Module, batch: PackedBatch, normaliser: int) -> ObjectiveOutput:
        hidden = forward_hidden(model, batch)
        token_logps = linear_logprobs(hidden, model.head_weight, batch.labels, chunk_size=self.chunk_size,
                                      vocab_chunk_size=self.vocab_chunk_size, vocab_size=model.vocab_size)
        policy = pair_up(*document_sums(token_logps, batch), batch)
        reference = None
        if self.reference is not None:
            ref_sums, _ = document_sums(batch.fields["ref_logprobs"], batch)
            reference = pair_up(ref_sums, torch.zeros_like(ref_sums), batch)
        per_pair, chosen_rewards, rejected_rewards = preference_losses(self.cfg, policy, reference)
        loss = per_pair.sum() / normaliser
        pairs = per_pair.numel()
        metrics = {
            "rewards/chosen": (chosen_rewards.sum(), pairs),
            "rewards/rejected": (rejected_rewards.sum(), pairs),
            "rewards/margins": ((chosen_rewards - rejected_rewards).sum(), pairs),
            "rewards/accuracies": ((chosen_rewards > rejected_rewards).float().sum(), pairs),
            "logps/chosen": (policy.chosen.detach().sum(), pairs),
            "logps/rejected": (policy.rejected.detach().sum(), pairs),
            "pref/loss": (per_pair.detach().sum(), pairs),
        }
        if self.cfg.sft_weight:
            sft = -policy.chosen.sum() / max(_counts(normaliser).get("chosen_tokens", 0), 1)
            loss = loss + self.cfg.sft_weight * sft
            metrics["pref/sft_loss"] = (-policy.chosen.detach().sum(), policy.chosen_tokens.sum())
        return ObjectiveOutput(loss, metrics)


def _counts(normaliser: int) -> dict[str, int]:
    return normaliser.counts if isinstance(normaliser, Normaliser) else {}
