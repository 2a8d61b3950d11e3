"""Knowledge distillation as an objective: the student matches a frozen teacher on the trained tokens.

The teacher's distribution comes from a live frozen model (a forward pass per micro-batch, its
final hidden states and head handed to the chunked op; a remote teacher, `RemoteTeacher`, is sent
the micro-batch first and computes while the student's forward runs) or from a top-k table computed before
training (`teacher_cache.py`; no teacher in memory). The loss and every metric come from one pass
over the student's head (`ops.linear_distill`); metrics are means over trained tokens:

    distill/divergence   the configured divergence (before T^2 and kd_weight)
    distill/ce           the student's cross-entropy on the data's labels
    distill/teacher_ce   the teacher's cross-entropy on the same labels
    distill/agreement    share of tokens where student and teacher rank the same token first
    distill/teacher_wait_s  a remote teacher only: mean seconds per micro-batch the student waited
                         for its hidden states after its own forward (0 when the teacher keeps up)
"""

from __future__ import annotations

import time

import torch
import torch.nn as nn

from posttrain.data.batch import PackedBatch
from posttrain.ops.distill import DistillLoss, linear_distill
from posttrain.ops.inputs import DEFAULT_CHUNK_SIZE, DEFAULT_VOCAB_CHUNK_SIZE
from posttrain.train.objective import MetricValue, Objective, ObjectiveOutput
from posttrain.train.objectives import forward_hidden
from posttrain.train.remote_teacher import RemoteTeacher
from posttrain.train.roles import FrozenModel
from posttrain.train.teacher_cache import TopKTable


class DistillationObjective(Objective):
    """`kd_weight * T^2 * divergence + (1 - kd_weight) * CE`, averaged over trained tokens."""

    name = "distill"
    normaliser = "tokens"

    def __init__(self, loss: DistillLoss, *, teacher: FrozenModel | RemoteTeacher | None = None,
                 table: TopKTable | None = None,
                 chunk_size: int = DEFAULT_CHUNK_SIZE, vocab_chunk_size: int = DEFAULT_VOCAB_CHUNK_SIZE):
        if (teacher is None) == (table is None):
            raise ValueError("a distillation objective takes a live teacher or a top-k table, one of them")
        self.loss, self.teacher, self.table = loss, teacher, table
        self.chunk_size, self.vocab_chunk_size = chunk_size, vocab_chunk_size
        self.remote: RemoteTeacher | None = teacher if isinstance(teacher, RemoteTeacher) else None
        # A local teacher's forward counts in MFU; a remote one computes on CPUs of its own.
        self.frozen_models = [teacher.model] if isinstance(teacher, FrozenModel) else []

    def compute(self, model: nn.Module, batch: PackedBatch, normaliser: int) -> ObjectiveOutput:
        if self.remote is not None:
            self.remote.model.submit(batch)  # it computes while the student's forward runs
        hidden = forward_hidden(model, batch)
        common = dict(loss=self.loss, chunk_size=self.chunk_size, vocab_chunk_size=self.vocab_chunk_size,
                      num_valid=normaliser, vocab_size=model.vocab_size)
        metrics: dict[str, MetricValue] = {}
        if self.teacher is not None:
            with self.teacher.active() as teacher:  # no grad, its head gathered until the end
                if self.remote is not None:
                    waited = time.perf_counter()
                    teacher_hidden = self.remote.model.collect()
                    metrics["distill/teacher_wait_s"] = (time.perf_counter() - waited, 1)
                else:
                    teacher_hidden = forward_hidden(teacher, batch)
                with torch.enable_grad():
                    out = linear_distill(hidden, model.head_weight, batch.labels, teacher_hidden=teacher_hidden,
                                         teacher_weight=teacher.head_weight, **common)
            teacher_ce = out.teacher_ce
        else:
            assert self.table is not None
            topk, teacher_ce = self.table.lookup(batch)
            out = linear_distill(hidden, model.head_weight, batch.labels, teacher_topk=topk, **common)
        n = out.ce.numel()
        metrics |= {
            "distill/divergence": (out.divergence.sum(), n),
            "distill/ce": (out.ce.sum(), n),
            "distill/teacher_ce": (teacher_ce.sum(), n),
            "distill/agreement": (out.agree.sum(), n),
        }
        return ObjectiveOutput(out.loss, metrics)

    def close(self) -> None:
        """End a remote teacher's process."""
        if self.remote is not None:
            self.remote.close()
