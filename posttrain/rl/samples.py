"""Rollouts as training samples: prompt + completion documents with per-token fields, packed.

A sample's tokens are its prompt ids then its generated ids; the labels train the generated ids
only (position `t` predicts token `t + 1`, the Sample contract). Per-token fields sit on the same
positions as the labels they belong to: `rollout_logprobs` (the engine's log-prob of that token)
and `advantages` (the sample's advantage), 0 elsewhere; `old_logprobs` is added by the no-grad
pass when a rollout feeds more than one update.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from posttrain.data.batch import IGNORE_INDEX, PackedBatch, Sample, collate
from posttrain.data.packing import BestFitPacker, Row

ROLLOUT_FIELDS = ("advantages", "rollout_logprobs")


def rollout_sample(prompt_ids: list[int], tokens: list[int], logprobs: list[float], advantage: float,
                   group: int) -> Sample:
    """One generated continuation as a trained document (see the module doc)."""
    k, m = len(prompt_ids), len(tokens)
    labels = [IGNORE_INDEX] * (k - 1) + list(tokens) + [IGNORE_INDEX]
    fields = {
        "rollout_logprobs": [0.0] * (k - 1) + [float(x) for x in logprobs] + [0.0],
        "advantages": [0.0] * (k - 1) + [float(advantage)] * m + [0.0],
    }
    return Sample(list(prompt_ids) + list(tokens), labels, fields=fields, group=group)


def pack(samples: list[Sample], row_length: int, seed: int) -> list[Row]:
    """Best-fit-decreasing rows of whole samples, in a seeded order (deterministic)."""
    packer = BestFitPacker(row_length, window_rows=1 << 30, seed=seed)
    for sample in samples:
        packer.add([sample])
    return packer.flush()


def micro_batches(rows: list[Row], *, rows_per_batch: int, row_length: int, pad_id: int,
                  field_names: tuple[str, ...], group: dist.ProcessGroup | None = None,
                  device: torch.device | str = "cpu") -> list[PackedBatch]:
    """`rows` in micro-batches of `rows_per_batch`; every data-parallel rank gets the same number
    of micro-batches (the most any rank needs; the rest are empty, all padding, no trained token)."""
    count = max(1, -(-len(rows) // rows_per_batch))  # an empty step still has one (empty) micro-batch
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        total = torch.tensor([count], dtype=torch.int64, device=device)
        dist.all_reduce(total, op=dist.ReduceOp.MAX, group=group)
        count = int(total)
    batches = []
    for i in range(count):
        chunk = rows[i * rows_per_batch : (i + 1) * rows_per_batch]
        chunk = chunk + [[] for _ in range(rows_per_batch - len(chunk))]
        batch = collate(chunk, row_length, pad_id)
        missing = {name: torch.zeros(batch.shape) for name in field_names if name not in batch.fields}
        batches.append(batch.with_fields(**missing) if missing else batch)
    return batches


def with_field(rows: list[Row], batch_values: torch.Tensor, name: str) -> list[Row]:
    """The rows' samples with per-token field `name` taken from `batch_values [len(rows), L]`
    (the layout `collate` gave them)."""
    out = []
    for r, row in enumerate(rows):
        offset, new_row = 0, []
        for sample in row:
            values = batch_values[r, offset : offset + len(sample)].tolist()
            new_row.append(Sample(sample.input_ids, sample.labels, sample.weights,
                                  {**(sample.fields or {}), name: values}, sample.group))
            offset += len(sample)
        out.append(new_row)
    return out
