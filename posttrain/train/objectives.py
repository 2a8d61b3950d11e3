"""Language-model objectives: the glue between a packed batch, the model and a chunked loss op."""

from __future__ import annotations

import torch
import torch.nn as nn

from posttrain.data.batch import PackedBatch
from posttrain.models.common.attention import packed_attention
from posttrain.ops import linear_cross_entropy
from posttrain.ops.inputs import DEFAULT_CHUNK_SIZE, DEFAULT_VOCAB_CHUNK_SIZE
from posttrain.train.objective import Objective, ObjectiveOutput


def forward_hidden(model: nn.Module, batch: PackedBatch) -> torch.Tensor:
    """Hidden states of a packed batch with document-causal attention."""
    rows, length = batch.input_ids.shape
    attn = packed_attention(batch.cu_seqlens, batch.max_seqlen, rows, length)
    return model(batch.input_ids, batch.position_ids, attn)


def check_supported(model: nn.Module) -> None:
    """Fail before training when the model needs something the chunked loss does not apply."""
    if getattr(model, "final_logit_softcap", None) is not None:
        raise ValueError(
            "this model applies final logit soft-capping, which the chunked cross-entropy does not; "
            "training it would optimise different logits than inference uses"
        )


def causal_lm_loss(
    model: nn.Module,
    batch: PackedBatch,
    num_valid: int,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    vocab_chunk_size: int = DEFAULT_VOCAB_CHUNK_SIZE,
) -> torch.Tensor:
    """Sum of next-token losses on trained positions of `batch`, divided by `num_valid`.

    Labels are already shifted per document by the data layer; ignored positions never reach the
    LM head.
    """
    hidden = forward_hidden(model, batch)
    return linear_cross_entropy(
        hidden,
        model.head_weight,
        batch.labels,
        chunk_size=chunk_size,
        vocab_chunk_size=vocab_chunk_size,
        reduction="mean",
        num_valid=num_valid,
        vocab_size=model.vocab_size,
    )


class CausalLMObjective(Objective):
    """Next-token cross-entropy on the trained tokens (SFT), averaged over trained tokens."""

    name = "causal_lm"
    normaliser = "tokens"

    def __init__(self, chunk_size: int = DEFAULT_CHUNK_SIZE, vocab_chunk_size: int = DEFAULT_VOCAB_CHUNK_SIZE):
        self.chunk_size, self.vocab_chunk_size = chunk_size, vocab_chunk_size

    def compute(self, model: nn.Module, batch: PackedBatch, normaliser: int) -> ObjectiveOutput:
        loss = causal_lm_loss(model, batch, normaliser, chunk_size=self.chunk_size,
                              vocab_chunk_size=self.vocab_chunk_size)
        return ObjectiveOutput(loss)


def document_lengths(batch: PackedBatch) -> list[int]:
    """Lengths of the real documents of a packed batch (padding pseudo-documents left out).

    A real document always has a trained token (the data layer drops samples without one), and
    padding never does.
    """
    bounds = batch.cu_seqlens.tolist()
    trained = (batch.labels.flatten() != -100).to(torch.int64).cumsum(0).tolist()
    lengths = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        before = trained[start - 1] if start > 0 else 0
        if trained[end - 1] - before > 0:
            lengths.append(end - start)
    return lengths
