"""`distill.teacher_signal: topk`: the teacher's top-k per trained token, computed once before training.

A `FrozenPass` (`frozen_pass.py`: fingerprinted, resumable mid-pass, safetensors parts) under
`<run_dir>/teacher_topk/<fingerprint>/` whose parts hold, per document, its key and its number of
trained tokens, and per trained token the teacher's top-k ids (int32), their log-probs at the
distillation temperature, the log-prob of the rest (`tail`) and the teacher's cross-entropy on
the label (a metric). The fingerprint adds k and the temperature to the data, tokenizer and
teacher files.

A document's key is a hash of its token ids and labels, so the table does not depend on the
order, epoch, batch or rank a document arrives in, and a document that repeats is stored once.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import Tensor

from posttrain.data.batch import IGNORE_INDEX, PackedBatch
from posttrain.ops.distill import TopK
from posttrain.ops.topk import linear_topk
from posttrain.train.frozen_pass import FrozenPass, load_parts
from posttrain.train.objectives import forward_hidden

CACHE_DIR = "teacher_topk"


def document_keys(batch: PackedBatch) -> tuple[list[int], list[int]]:
    """Keys and trained-token counts of the batch's documents that train, in row-major order."""
    ids, labels = batch.input_ids.flatten().cpu(), batch.labels.flatten().cpu()
    bounds = batch.cu_seqlens.tolist()
    keys, counts = [], []
    for start, end in zip(bounds[:-1], bounds[1:]):
        trained = int((labels[start:end] != IGNORE_INDEX).sum())
        if trained == 0:
            continue  # padding, or a document with nothing to distil
        digest = hashlib.blake2b(ids[start:end].numpy().tobytes(), digest_size=8)
        digest.update(labels[start:end].numpy().tobytes())
        keys.append(int.from_bytes(digest.digest(), "little", signed=True))
        counts.append(trained)
    return keys, counts


class TopKPass(FrozenPass):
    """Computes (or reuses) the teacher's top-k table for one run; collective over all ranks."""

    cache = CACHE_DIR
    count_name = "documents_scored"

    def score_fn(self, *, k: int, temperature: float, chunk_size: int, vocab_chunk_size: int):
        def score(model: torch.nn.Module, batch: PackedBatch) -> dict[str, Tensor]:
            keys, counts = document_keys(batch)
            out = linear_topk(forward_hidden(model, batch), model.head_weight, batch.labels, k=k,
                              temperature=temperature, chunk_size=chunk_size, vocab_chunk_size=vocab_chunk_size,
                              vocab_size=model.vocab_size)
            return {"keys": torch.tensor(keys, dtype=torch.long), "counts": torch.tensor(counts, dtype=torch.long),
                    "ids": out.topk.ids.int(), "logprobs": out.topk.logprobs, "tail": out.topk.tail,
                    "teacher_ce": out.ce}

        return score

    def table(self) -> TopKTable:
        return TopKTable.load(self.directory)


class TopKTable:
    """The stored top-k rows, looked up per batch by document key."""

    def __init__(self, keys: Tensor, counts: Tensor, rows: dict[str, Tensor], origin: str):
        starts = torch.cumsum(counts, 0) - counts
        self.index: dict[int, tuple[int, int]] = {}
        for key, start, count in zip(keys.tolist(), starts.tolist(), counts.tolist()):
            self.index.setdefault(key, (start, count))  # a repeated document: the first is kept
        self.rows, self.origin = rows, origin

    @classmethod
    def load(cls, directory: Path) -> TopKTable:
        parts = list(load_parts(directory))
        if not parts:
            raise ValueError(f"{directory}: the teacher's top-k table holds no rows")
        merged = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
        keys, counts = merged.pop("keys"), merged.pop("counts")
        return cls(keys, counts, merged, str(directory))

    def __len__(self) -> int:
        return len(self.index)

    def lookup(self, batch: PackedBatch) -> tuple[TopK, Tensor]:
        """The rows of the batch's trained tokens (row-major), and the teacher's CE on each."""
        pieces = []
        for key, count in zip(*document_keys(batch)):
            found = self.index.get(key)
            if found is None or found[1] != count:
                raise KeyError(f"{self.origin}: no teacher top-k rows for a document of {count} trained tokens "
                               f"(key {key:#x}); the table was made from other data or rendering")
            pieces.append(torch.arange(found[0], found[0] + count))
        index = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)
        device = batch.input_ids.device
        rows = {name: tensor.index_select(0, index).to(device) for name, tensor in self.rows.items()}
        return TopK(rows["ids"].long(), rows["logprobs"], rows["tail"]), rows["teacher_ce"]
