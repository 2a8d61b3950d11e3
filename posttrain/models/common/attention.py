"""Attention metadata: which keys each query may see in one forward.

Every token carries a *segment id*. A query may attend to a key of the same row when

* both have the same segment id (documents of a packed row; padding is a segment of its own),
* the key is not after the query (causal), and
* on sliding-window layers, the key is fewer than `window` slots behind the query.

Queries occupy the last `Lq` of the `Lk` key slots (`q_offset = Lk - Lq`), which is how one
KV-cache decode step attends to its cached prefix with the same rule.

Build an `AttentionMeta` with one of

* `packed_attention(cu_seqlens, max_seqlen, batch_size, seq_len)` — from the data layer's
  PackedBatch (`cu_seqlens` are document boundaries over the flattened `B*L` tokens);
* `padded_attention(attention_mask, query_len=None)` — from a padded (left or right) `[B, Lk]`
  mask of 1 for real tokens and 0 for padding; `query_len` selects the last slots as queries
  (a decode step);
* `None` — plain causal attention within each row.

Backends (`posttrain.models.common.backends`) turn the metadata into their own mask form (dense
boolean mask, FlexAttention block mask, flash-attn `cu_seqlens`) and cache it on the object, so the
mask is built once per forward for full layers and once for sliding layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class AttentionMeta:
    """Segment ids of queries `[B, Lq]` and keys `[B, Lk]`, plus flash-attn boundaries if known.

    `cu_seqlens` / `max_seqlen` (int32 boundaries over the flattened `B*Lq` query tokens) are kept
    when the caller already has them (packed batches) so the varlen backend needs no host sync.
    `plain_causal` marks metadata that carries no restriction beyond causality, letting dense
    backends use their causal fast path.
    """

    q_segments: torch.Tensor
    k_segments: torch.Tensor
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int | None = None
    plain_causal: bool = False
    masks: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.q_segments.dim() != 2 or self.k_segments.dim() != 2:
            raise ValueError("segment ids must be [batch, length] tensors")
        if self.q_segments.shape[0] != self.k_segments.shape[0]:
            raise ValueError("queries and keys must have the same batch size")
        if self.q_segments.shape[1] > self.k_segments.shape[1]:
            raise ValueError("there cannot be more query slots than key slots")

    @property
    def batch_size(self) -> int:
        return self.q_segments.shape[0]

    @property
    def q_len(self) -> int:
        return self.q_segments.shape[1]

    @property
    def k_len(self) -> int:
        return self.k_segments.shape[1]

    @property
    def q_offset(self) -> int:
        """Slot index of the first query among the keys."""
        return self.k_len - self.q_len

    def cached(self, key: Any, build) -> Any:
        """Return the backend mask stored under `key`, building it with `build()` once."""
        if key not in self.masks:
            self.masks[key] = build()
        return self.masks[key]

    def varlen_boundaries(self) -> tuple[torch.Tensor, int]:
        """int32 `cu_seqlens` over the flattened queries and the longest run (for flash-attn)."""
        if self.cu_seqlens is None:
            self.cu_seqlens, self.max_seqlen = _runs_to_cu_seqlens(self.q_segments)
        assert self.max_seqlen is not None
        return self.cu_seqlens, self.max_seqlen


def causal_attention(
    batch_size: int, seq_len: int, device: torch.device | str = "cpu"
) -> AttentionMeta:
    """Plain causal attention within each row (what `attn=None` means)."""
    segments = torch.zeros(batch_size, seq_len, dtype=torch.int32, device=device)
    return AttentionMeta(segments, segments, plain_causal=True)


def packed_attention(
    cu_seqlens: torch.Tensor, max_seqlen: int, batch_size: int, seq_len: int
) -> AttentionMeta:
    """Document-causal attention for packed rows.

    `cu_seqlens` is the int32 tensor of document boundaries over the flattened `batch_size *
    seq_len` tokens (first entry 0, last entry `batch_size * seq_len`); documents must not cross
    row boundaries. `max_seqlen` is the longest document.
    """
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError("cu_seqlens must be a 1-D tensor [num_documents + 1] of boundaries")
    total = batch_size * seq_len
    starts = torch.zeros(total, dtype=torch.int32, device=cu_seqlens.device)
    inner = cu_seqlens[1:-1].long()
    starts[inner[inner < total]] = 1
    segments = torch.cumsum(starts, 0, dtype=torch.int32).view(batch_size, seq_len)
    return AttentionMeta(
        segments, segments, cu_seqlens=cu_seqlens.to(torch.int32), max_seqlen=int(max_seqlen)
    )


def padded_attention(attention_mask: torch.Tensor, query_len: int | None = None) -> AttentionMeta:
    """Attention for padded rows: `attention_mask [B, Lk]` is 1 on real tokens, 0 on padding.

    Real tokens attend causally to the real tokens before them; padding only to padding (its
    outputs are meaningless but finite). With `query_len`, only the last `query_len` slots are
    queries: a decode step over a KV cache whose slots the mask describes.
    """
    if attention_mask.dim() != 2:
        raise ValueError("attention_mask must be [batch, length]")
    keys = attention_mask.to(torch.int32)
    queries = keys if query_len is None else keys[:, keys.shape[1] - query_len :]
    return AttentionMeta(queries, keys)


def _runs_to_cu_seqlens(segments: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Boundaries of runs of equal segment ids, each row starting a new run."""
    batch, length = segments.shape
    new_run = torch.ones_like(segments, dtype=torch.bool)
    new_run[:, 1:] = segments[:, 1:] != segments[:, :-1]
    starts = new_run.flatten().nonzero().squeeze(1)
    end = torch.tensor([batch * length], device=segments.device)
    cu = torch.cat([starts, end]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max().item())
