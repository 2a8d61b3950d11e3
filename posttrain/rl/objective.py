"""`PolicyGradientObjective`: the policy loss (`policy_loss.py`) as a trainer objective.

It reads the rollout's per-token fields (`advantages`, `rollout_logprobs`, optionally
`old_logprobs` and the reference's `ref_logprobs`), recomputes the policy's log-probs of the
sampled tokens at the sampling temperature through the chunked head op (with the entropy from the
same pass), and averages per token or per sequence as configured. Without `old_logprobs` (one
update per rollout) the old policy is the current one: `old = logprobs.detach()`, so the ratio is 1
in value and the precision metrics compare the engine with this very forward pass.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from posttrain.data.batch import IGNORE_INDEX, PackedBatch
from posttrain.ops import linear_logprobs
from posttrain.rl.policy_loss import PolicyLossSettings, PolicyTokens, policy_loss
from posttrain.train.objective import Objective, ObjectiveOutput
from posttrain.train.objectives import forward_hidden
from posttrain.train.reference import LiveReference


class PolicyGradientObjective(Objective):
    name = "policy_gradient"
    required_fields = frozenset({"advantages", "rollout_logprobs"})
    optional_fields = frozenset({"old_logprobs", "ref_logprobs"})

    def __init__(self, settings: PolicyLossSettings, *, temperature: float, reference: LiveReference | None,
                 chunk_size: int, vocab_chunk_size: int, lm_head_fp32: bool = False):
        if settings.beta > 0 and reference is None:
            raise ValueError("a KL term (beta > 0) needs a reference")
        self.settings, self.temperature, self.reference = settings, temperature, reference
        self.chunk_size, self.vocab_chunk_size = chunk_size, vocab_chunk_size
        self.matmul_dtype = torch.float32 if lm_head_fp32 else None
        self.normaliser = settings.normaliser
        self.frozen_forwards = reference.frozen_forwards if reference is not None else 0

    def prepare(self, batch: PackedBatch) -> PackedBatch:
        return self.reference(batch) if self.reference is not None else batch

    def compute(self, model: nn.Module, batch: PackedBatch, normaliser: int) -> ObjectiveOutput:
        hidden = forward_hidden(model, batch)
        logprobs, entropy = linear_logprobs(
            hidden, model.head_weight, batch.labels, chunk_size=self.chunk_size,
            vocab_chunk_size=self.vocab_chunk_size, vocab_size=model.vocab_size,
            temperature=self.temperature, return_entropy=True, matmul_dtype=self.matmul_dtype)
        scored = batch.labels != IGNORE_INDEX
        current = logprobs[scored]
        old = batch.fields["old_logprobs"][scored] if "old_logprobs" in batch.fields else current.detach()
        ref = batch.fields["ref_logprobs"][scored] if "ref_logprobs" in batch.fields else None
        tokens = PolicyTokens(
            logprobs=current, old=old, rollout=batch.fields["rollout_logprobs"][scored],
            advantages=batch.fields["advantages"][scored], doc=batch.document_ids[scored],
            num_docs=batch.num_documents, entropy=entropy[scored], ref=ref)
        loss, metrics, maxima = policy_loss(tokens, self.settings, normaliser)
        # An all-padding micro-batch still takes part in the backward (FSDP needs every rank's).
        loss = loss + 0.0 * hidden.sum() if current.numel() == 0 else loss
        return ObjectiveOutput(loss, metrics, maxima)
