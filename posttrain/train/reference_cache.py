"""`dpo.reference: precompute`: one no-grad pass of the reference over the data before training.

A `FrozenPass` (`frozen_pass.py`: fingerprinted, resumable, safetensors parts) whose rows are
pairs: `ids [N]` int64 (the pair ids) and `sums [N, 2]` float32 (the reference log-prob sums of
chosen and rejected), under `<run_dir>/reference/<fingerprint>/`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from posttrain.config.data import DataConfig
from posttrain.data.batch import PackedBatch
from posttrain.train.frozen_pass import COMPLETE_FILE, FrozenPass, fingerprint_inputs, load_parts, stream_configs
from posttrain.train.preference import check_pairs, document_sums
from posttrain.train.reference import ReferenceTable, token_logprobs
from posttrain.train.roles import FrozenModel

CACHE_DIR = "reference"
__all__ = ["CACHE_DIR", "COMPLETE_FILE", "ReferencePass", "fingerprint_inputs", "load_table", "stream_configs"]


class ReferencePass(FrozenPass):
    """Computes (or reuses) the reference table for one run on this rank; collective over all ranks."""

    cache = CACHE_DIR
    count_name = "pairs_scored"

    def table(self) -> ReferenceTable:
        """The whole table (every rank's parts); the pass must be complete."""
        return load_table(self.directory)

    def run(self, streams: list[DataConfig], frozen: Callable[[], FrozenModel], *, tokenizer,  # type: ignore[override]
            batch_size: int, dp_rank: int, dp_size: int, precision: str, chunk_size: int,
            vocab_chunk_size: int) -> None:
        def score(model: torch.nn.Module, batch: PackedBatch) -> dict[str, torch.Tensor]:
            check_pairs(batch)
            logps = token_logprobs(model, batch, chunk_size=chunk_size, vocab_chunk_size=vocab_chunk_size)
            per_doc, _ = document_sums(logps.float(), batch)
            return {"ids": batch.groups[0::2], "sums": per_doc.view(-1, 2).float()}

        super().run(streams, frozen, score, tokenizer=tokenizer, batch_size=batch_size, dp_rank=dp_rank,
                    dp_size=dp_size, precision=precision)


def load_table(directory: Path) -> ReferenceTable:
    """The table stored in `directory` (every rank's parts)."""
    parts = list(load_parts(directory))
    if not parts:
        return ReferenceTable(torch.zeros(0, dtype=torch.long), torch.zeros(0, 2), str(directory))
    ids_all = torch.cat([p["ids"] for p in parts])
    sums_all = torch.cat([p["sums"] for p in parts])
    # A pair seen twice (data-parallel replicas, the same file in training and evaluation) has
    # one value per occurrence, equal up to batch composition: the first one is kept.
    unique, inverse = torch.unique(ids_all, return_inverse=True)
    first = torch.full((len(unique),), len(ids_all), dtype=torch.long).scatter_reduce(
        0, inverse, torch.arange(len(ids_all)), reduce="amin")
    return ReferenceTable(unique, sums_all[first], str(directory))
