"""The two data contracts: `Sample` (one rendered document) and `PackedBatch` (what models eat).

A `Sample` carries labels that are already shifted: `labels[t]` is the token position `t` must
predict, -100 where nothing is trained, and always -100 at the document's last position. Shifting
once, per document, is what keeps packed documents from predicting each other.

A `PackedBatch` holds `B` rows of `L` tokens. Each row is a run of whole documents followed, when the
row is not full, by one padding pseudo-document (pad ids, labels -100). `position_ids` restart at 0
for every segment and `cu_seqlens` marks the segment boundaries over the flattened `B * L` tokens,
the layout varlen attention kernels take.

Typed extras travel with the tokens through packing, `collate` and `.to()`: `document_ids` (which
real document of the batch each token belongs to, -1 for padding), `groups` (each document's
pair/group id, -1 when it has none) and `fields`, named per-token float tensors (reference or
rollout log-probs, advantages, teacher inputs) that objectives declare they read.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from dataclasses import field as dataclass_field
from functools import cached_property

import torch

IGNORE_INDEX = -100


@dataclass
class Sample:
    """One rendered document. Treated as immutable once built (packers share references)."""

    input_ids: list[int]
    labels: list[int]
    weights: list[float] | None = None  # optional per-token loss weights
    fields: dict[str, list[float]] | None = None  # optional named per-token float fields
    group: int | None = None  # pair/group id shared by the documents of one unit (e.g. a DPO pair)

    def __post_init__(self) -> None:
        assert len(self.input_ids) == len(self.labels), "input_ids and labels differ in length"
        assert self.weights is None or len(self.weights) == len(self.input_ids)
        for name, values in (self.fields or {}).items():
            assert len(values) == len(self.input_ids), f"field {name!r} differs in length from input_ids"

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
        fields = None if self.fields is None else {k: v[:length] for k, v in self.fields.items()}
        return Sample(self.input_ids[:length], labels, weights, fields, self.group)

    def to_dict(self) -> dict:
        out: dict = {"input_ids": self.input_ids, "labels": self.labels}
        if self.weights is not None:
            out["weights"] = self.weights
        if self.fields is not None:
            out["fields"] = self.fields
        if self.group is not None:
            out["group"] = self.group
        return out

    @classmethod
    def from_dict(cls, data: dict) -> Sample:
        return cls(list(data["input_ids"]), list(data["labels"]), data.get("weights"), data.get("fields"),
                   data.get("group"))


def samples_to_dicts(lists: list[list[Sample]]) -> list[list[dict]]:
    """Lists of samples (rows, groups, steps) as plain JSON-compatible data."""
    return [[s.to_dict() for s in samples] for samples in lists]


def samples_from_dicts(lists: list[list[dict]]) -> list[list[Sample]]:
    return [[Sample.from_dict(s) for s in samples] for samples in lists]


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
    document_ids: torch.Tensor | None = None  # [B, L] long: document index in the batch, -1 = padding
    groups: torch.Tensor | None = None  # [num_documents] long: pair/group id per document, -1 = none
    fields: dict[str, torch.Tensor] = dataclass_field(default_factory=dict)  # name -> [B, L] float32

    @property
    def shape(self) -> torch.Size:
        return self.input_ids.shape

    def with_fields(self, **new: torch.Tensor) -> PackedBatch:
        """A copy carrying `new` per-token fields ([B, L] each) beside the existing ones."""
        for name, value in new.items():
            if value.shape != self.input_ids.shape:
                raise ValueError(f"field {name!r} has shape {tuple(value.shape)}, the batch is "
                                 f"{tuple(self.input_ids.shape)}")
        return replace(self, fields={**self.fields, **new})

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> PackedBatch:
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                value = fn(value)
            elif isinstance(value, dict):
                value = {k: fn(v) for k, v in value.items()}
            out[f.name] = value
        return PackedBatch(**out)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PackedBatch:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> PackedBatch:
        return self._map(lambda t: t.pin_memory())


def _field_names(rows: Sequence[Sequence[Sample]]) -> list[str]:
    """Names of the per-token fields; every real document must carry the same ones."""
    docs = [s for row in rows for s in row]
    names = sorted(docs[0].fields or {}) if docs else []
    for sample in docs:
        if sorted(sample.fields or {}) != names:
            raise ValueError(f"documents of one batch carry different fields: {names} vs "
                             f"{sorted(sample.fields or {})}")
    return names


def collate(rows: Sequence[Sequence[Sample]], row_length: int, pad_id: int) -> PackedBatch:
    """Lay `rows` (each a list of whole documents) into a `PackedBatch` of `len(rows)` x `row_length`.

    A row shorter than `row_length` gets one trailing padding pseudo-document. An empty row is all
    padding (a rank can receive one at the very end of the data, so every rank gets a batch).
    Padding has document id -1 and 0 in every field.
    """
    num_rows = len(rows)
    assert num_rows > 0 and row_length > 0
    shape = (num_rows, row_length)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    document_ids = torch.full(shape, -1, dtype=torch.long)
    has_weights = any(s.weights is not None for row in rows for s in row)
    weights = torch.zeros(shape, dtype=torch.float32) if has_weights else None
    extra = {name: torch.zeros(shape, dtype=torch.float32) for name in _field_names(rows)}
    boundaries, groups = [0], []
    max_seqlen = num_tokens = num_trained = 0
    for r, row in enumerate(rows):
        offset = 0
        for sample in row:
            n = len(sample)
            end = offset + n
            assert end <= row_length, f"row {r} holds {end} tokens > row length {row_length}"
            input_ids[r, offset:end] = torch.tensor(sample.input_ids, dtype=torch.long)
            labels[r, offset:end] = torch.tensor(sample.labels, dtype=torch.long)
            position_ids[r, offset:end] = torch.arange(n)
            document_ids[r, offset:end] = len(groups)
            if weights is not None:
                if sample.weights is None:
                    weights[r, offset:end] = (labels[r, offset:end] != IGNORE_INDEX).float()
                else:
                    weights[r, offset:end] = torch.tensor(sample.weights, dtype=torch.float32)
            for name, values in (sample.fields or {}).items():
                extra[name][r, offset:end] = torch.tensor(values, dtype=torch.float32)
            boundaries.append(r * row_length + end)
            groups.append(-1 if sample.group is None else sample.group)
            max_seqlen = max(max_seqlen, n)
            num_tokens += n
            num_trained += sample.num_trained
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
        num_documents=len(groups),
        weights=weights,
        document_ids=document_ids,
        groups=torch.tensor(groups, dtype=torch.long),
        fields=extra,
    )
