"""Distillation KL through the same chunked head path: neither model's full logits are needed."""

from __future__ import annotations

import torch
from torch import Tensor

from posttrain.ops.head_stats import Plan, Teacher, head_stats
from posttrain.ops.inputs import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_VOCAB_CHUNK_SIZE,
    check_chunks,
    check_head,
    check_reduction,
    reduce,
    select,
)


def linear_kl(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    teacher_logits: Tensor | None = None,
    teacher_hidden: Tensor | None = None,
    teacher_weight: Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    vocab_chunk_size: int = DEFAULT_VOCAB_CHUNK_SIZE,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_valid: int | float | Tensor | None = None,
    vocab_size: int | None = None,
    matmul_dtype: torch.dtype | None = None,
) -> Tensor:
    """Forward KL(teacher || student) per labelled token, student head `hidden @ weight.T`.

    The teacher is either `teacher_logits` (`[*labels.shape, >=vocab_size]`, e.g. from a
    teacher server) or `teacher_hidden` (`[*labels.shape, d_t]`) with `teacher_weight`
    (`[>=vocab_size, d_t]`), projected tile by tile like the student. Both distributions are
    taken over the first `vocab_size` tokens (the models must share that vocabulary) at
    `temperature`; the result is *not* multiplied by `temperature**2`. Only positions whose label
    is not `ignore_index` are distilled; the label values themselves are not used otherwise.
    Gradients reach `hidden` and `weight`, never the teacher. `reduction` and `num_valid` are as
    in `linear_cross_entropy`.
    """
    check_chunks(chunk_size, vocab_chunk_size)
    check_reduction(reduction)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    sel = select(
        hidden, weight, labels, ignore_index=ignore_index, vocab_size=vocab_size, matmul_dtype=matmul_dtype
    )
    scale = 1.0 / temperature
    if (teacher_logits is None) == (teacher_hidden is None and teacher_weight is None):
        raise ValueError("pass either teacher_logits, or teacher_hidden with teacher_weight")
    if teacher_logits is not None:
        if teacher_logits.shape[:-1] != labels.shape or teacher_logits.shape[-1] < sel.vocab_size:
            raise ValueError(
                f"teacher_logits shape {tuple(teacher_logits.shape)} must be [*labels.shape, >={sel.vocab_size}] "
                f"(labels shape {tuple(labels.shape)})"
            )
        flat = teacher_logits.detach().reshape(-1, teacher_logits.shape[-1])
        teacher = Teacher(logits=flat, index=sel.index, scale=scale)
    else:
        if teacher_hidden is None or teacher_weight is None:
            raise ValueError("teacher_hidden and teacher_weight go together")
        teacher_vocab = check_head(teacher_hidden, teacher_weight, None, role="teacher_")
        if teacher_hidden.shape[:-1] != labels.shape or teacher_vocab < sel.vocab_size:
            raise ValueError(
                f"teacher_hidden {tuple(teacher_hidden.shape)} must be [*labels.shape, d] and teacher_weight "
                f"{tuple(teacher_weight.shape)} must have >= {sel.vocab_size} rows (labels {tuple(labels.shape)})"
            )
        rows = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1]).index_select(0, sel.index)
        teacher = Teacher(hidden=rows, weight=teacher_weight.detach(), scale=scale)
    plan = Plan(
        vocab_size=sel.vocab_size,
        chunk_size=chunk_size,
        vocab_chunk_size=vocab_chunk_size,
        compute_dtype=sel.compute_dtype,
        scale=scale,
    )
    kl = head_stats(sel.hidden, weight, sel.targets, plan, teacher)[4]
    return reduce(kl, sel, reduction, num_valid)
