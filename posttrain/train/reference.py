"""Reference log-probs for preference objectives, as the per-token batch field `ref_logprobs`.

Two providers, both called as `provider(batch) -> batch` in the objective's no-grad `prepare`:

- `LiveReference`: a frozen role (a copy, or a LoRA policy with its adapters off) runs a forward
  pass over the micro-batch; `ref_logprobs` holds its log-prob of every scored token.
- `CachedReference`: a table of per-document sums computed before training
  (`reference_cache.py`), looked up by pair id; each document's sum is written on its first
  scored token (the objective only ever sums the field over a document).
"""

from __future__ import annotations

import torch
from torch import Tensor

from posttrain.data.batch import IGNORE_INDEX, PackedBatch
from posttrain.ops import linear_logprobs
from posttrain.train.objectives import forward_hidden
from posttrain.train.preference import check_pairs
from posttrain.train.roles import FrozenModel


def token_logprobs(model: torch.nn.Module, batch: PackedBatch, *, chunk_size: int, vocab_chunk_size: int,
                   temperature: float = 1.0, matmul_dtype: torch.dtype | None = None) -> Tensor:
    """`[B, L]` fp32 log-probs of each scored label under `model` at `temperature` (0 where
    nothing is scored); `matmul_dtype` forces the head's GEMM dtype (e.g. fp32 under autocast)."""
    hidden = forward_hidden(model, batch)
    return linear_logprobs(hidden, model.head_weight, batch.labels, chunk_size=chunk_size,
                           vocab_chunk_size=vocab_chunk_size, vocab_size=model.vocab_size, temperature=temperature,
                           matmul_dtype=matmul_dtype)


class LiveReference:
    """Reference log-probs from a frozen model, one extra forward pass per micro-batch."""

    frozen_forwards = 1  # counted in MFU

    def __init__(self, frozen: FrozenModel, *, chunk_size: int, vocab_chunk_size: int, temperature: float = 1.0):
        self.frozen, self.chunk_size, self.vocab_chunk_size = frozen, chunk_size, vocab_chunk_size
        self.temperature = temperature

    def __call__(self, batch: PackedBatch) -> PackedBatch:
        with self.frozen.active() as model:
            logps = token_logprobs(model, batch, chunk_size=self.chunk_size, vocab_chunk_size=self.vocab_chunk_size,
                                   temperature=self.temperature)
        return batch.with_fields(ref_logprobs=logps.float())


def first_scored_positions(batch: PackedBatch) -> Tensor:
    """`[num_documents]` flat index of each document's first scored token (-1: none scored)."""
    docs = batch.document_ids.flatten()
    scored = (batch.labels.flatten() != IGNORE_INDEX) & (docs >= 0)
    where = torch.nonzero(scored).flatten()
    first = torch.full((batch.num_documents,), batch.input_ids.numel(), dtype=torch.long, device=docs.device)
    first = first.scatter_reduce(0, docs[where], where, reduce="amin")
    return torch.where(first == batch.input_ids.numel(), -1, first)


class ReferenceTable:
    """Per-pair reference sums: `ids` (sorted pair ids) and `values` `[N, 2]` (chosen, rejected)."""

    def __init__(self, ids: Tensor, values: Tensor, origin: str):
        order = torch.argsort(ids)
        self.ids, self.values, self.origin = ids[order], values[order].float(), origin
        if len(self.ids) > 1 and bool((self.ids[1:] == self.ids[:-1]).any()):
            raise ValueError(f"{origin}: a pair id occurs twice")

    def __len__(self) -> int:
        return len(self.ids)

    def lookup(self, groups: Tensor) -> Tensor:
        """`[num_pairs, 2]` sums for the pair ids `groups` (one per pair); a missing id is an error."""
        ids, values = self.ids.to(groups.device), self.values.to(groups.device)
        index = torch.searchsorted(ids, groups).clamp(max=max(len(ids) - 1, 0))
        found = ids[index] == groups if len(ids) else torch.zeros_like(groups, dtype=torch.bool)
        if not bool(found.all()):
            missing = int(groups[~found][0])
            raise KeyError(f"{self.origin}: no reference log-probs for pair {missing:#x} (source key "
                           f"{missing >> 40:#x}, line {missing & ((1 << 40) - 1)}); the table does not "
                           "cover this pair")
        return values[index]


class CachedReference:
    """Reference log-probs from a precomputed table: no reference model in memory."""

    frozen_forwards = 0

    def __init__(self, table: ReferenceTable):
        self.table = table

    def __call__(self, batch: PackedBatch) -> PackedBatch:
        check_pairs(batch)
        pairs = self.table.lookup(batch.groups[0::2].contiguous())  # chosen documents come first in each pair
        sums = pairs.flatten()  # document order: chosen, rejected, chosen, ...
        first = first_scored_positions(batch)
        field = torch.zeros(batch.input_ids.numel(), dtype=torch.float32, device=batch.input_ids.device)
        keep = first >= 0
        field[first[keep]] = sums[keep]
        return batch.with_fields(ref_logprobs=field.view(batch.shape))
