"""The two data contracts: `Sample` (one rendered document) and `PackedBatch` (what models eat).

A `Sample` carries labels that are already shifted: `labels[t]` is the token position `t` must
predict, -100 where nothing is trained, and always -100 at the document's last position. Shifting
once, per document, is what keeps packed documents from predicting each other.

A `PackedBatch` holds `B` rows of `L` tokens. Each row is a run of whole documents followed, when the
row is not full, by one padding pseudo-document (pad ids, labels -100). `position_ids` restart at 0
for every segment and `cu_seqlens` marks the segment boundaries over the flattened `B * L` tokens,
the layout varlen attention kernels take.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from functools import cached_property

import torch

IGNORE_INDEX = -100


@dataclass
class Sample:
    """One rendered document. Treated as immutable once built (packers share references)."""

    input_ids: list[int]
    labels: list[int]
    weights: list[float] | None = None  # optional per-token loss weights

    def __post_init__(self) -> None:
        assert len(self.input_ids) == len(self.labels), "input_ids and labels differ in length"
        assert self.weights is None or len(self.weights) == len(self.input_ids)

    def __len__(self) -> int:
        return len(self.input_ids)

    @cached_property
    def num_trained(self) -> int:
        return len(self.labels) - self.labels.count(IGNORE_INDEX)

    def truncated(self, length: int) -> Sample:
        """The first `length` tokens; the new last position predicts nothing (Sample contract)."""
        labels = self.labels[:length]
        labels[-1] = IGNORE_INDEX
        weights = None if self.weights is None else self.weights[:length]
        return Sample(self.input_ids[:length], labels, weights)

    def to_dict(self) -> dict:
        out = {"input_ids": self.input_ids, "labels": self.labels}
        if self.weights is not None:
            out["weights"] = self.weights
        return out

    @classmethod
    def from_dict(cls, data: dict) -> Sample:
        return cls(list(data["input_ids"]), list(data["labels"]), data.get("weights"))


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # [B, L] long
    labels: torch.Tensor  # [B, L] long, shifted per document, -100 = not trained
    position_ids: torch.Tensor  # [B, L] long, restarting at 0 for every segment
    cu_seqlens: torch.Tensor  # [num_segments + 1] int32 over the flattened B*L tokens
    max_seqlen: int  # longest segment (padding pseudo-documents included)
    num_tokens: int  # tokens of real documents (padding excluded)
    num_trained_tokens: int  # labels != -100
    num_documents: int  # real documents (padding pseudo-documents excluded)
    weights: torch.Tensor | None = None  # [B, L] float, only when some sample carries weights

    @property
    def shape(self) -> torch.Size:
        return self.input_ids.shape

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PackedBatch:
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                value = value.to(device, non_blocking=non_blocking)
            moved[f.name] = value
        return PackedBatch(**moved)

    def pin_memory(self) -> PackedBatch:
        pinned = {}
        for f in fields(self):
            value = getattr(self, f.name)
            pinned[f.name] = value.pin_memory() if isinstance(value, torch.Tensor) else value
        return PackedBatch(**pinned)


def collate(rows: Sequence[Sequence[Sample]], row_length: int, pad_id: int) -> PackedBatch:
    """Lay `rows` (each a list of whole documents) into a `PackedBatch` of `len(rows)` x `row_length`.

    A row shorter than `row_length` gets one trailing padding pseudo-document. An empty row is all
    padding (a rank can receive one at the very end of the data, so every rank gets a batch).
    """
    num_rows = len(rows)
    assert num_rows > 0 and row_length > 0
    input_ids = torch.full((num_rows, row_length), pad_id, dtype=torch.long)
    labels = torch.full((num_rows, row_length), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((num_rows, row_length), dtype=torch.long)
    has_weights = any(s.weights is not None for row in rows for s in row)
    weights = torch.zeros((num_rows, row_length), dtype=torch.float32) if has_weights else None
    boundaries = [0]
    max_seqlen = num_tokens = num_trained = num_docs = 0
    for r, row in enumerate(rows):
        offset = 0
        for sample in row:
            n = len(sample)
            end = offset + n
            assert end <= row_length, f"row {r} holds {end} tokens > row length {row_length}"
            input_ids[r, offset:end] = torch.tensor(sample.input_ids, dtype=torch.long)
            labels[r, offset:end] = torch.tensor(sample.labels, dtype=torch.long)
            position_ids[r, offset:end] = torch.arange(n)
            if weights is not None:
                if sample.weights is None:
                    weights[r, offset:end] = (labels[r, offset:end] != IGNORE_INDEX).float()
                else:
                    weights[r, offset:end] = torch.tensor(sample.weights, dtype=torch.float32)
            boundaries.append(r * row_length + end)
            max_seqlen = max(max_seqlen, n)
            num_tokens += n
            num_trained += sample.num_trained
            num_docs += 1
            offset = end
        pad = row_length - offset
        if pad:
            position_ids[r, offset:] = torch.arange(pad)
            boundaries.append((r + 1) * row_length)
            max_seqlen = max(max_seqlen, pad)
    return PackedBatch(
        input_ids=input_ids,
        labels=labels,
        position_ids=position_ids,
        cu_seqlens=torch.tensor(boundaries, dtype=torch.int32),
        max_seqlen=max_seqlen,
        num_tokens=num_tokens,
        num_trained_tokens=num_trained,
        num_documents=num_docs,
        weights=weights,
    )
