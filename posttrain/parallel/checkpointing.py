"""Activation checkpointing per transformer block: keep block inputs and attention outputs,
recompute the rest in backward."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    checkpoint_wrapper,
)
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

# Fused attention kernels whose outputs (the attention output and its log-sum-exp, a few MiB per
# block) are kept rather than recomputed: recomputing them costs a second attention forward per
# block, while everything else a block recomputes is matmuls and elementwise ops of its inputs.
_SAVED_OPS = tuple(
    getattr(torch.ops.aten, name).default
    for name in (
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
    )
    if hasattr(torch.ops.aten, name)
)


def _keep_attention(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _context():
    return create_selective_checkpoint_contexts(_keep_attention)


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Wrap every block in `model.layers` (in place); returns how many were wrapped.

    Non-reentrant checkpointing, so it composes with `torch.compile`, FSDP2 and frozen (LoRA)
    weights. The outputs of the fused attention kernels are saved (selective checkpointing), so
    backward recomputes each block's matmuls and elementwise ops but not its attention. The
    wrapper keeps the wrapped block's state-dict keys unchanged.
    """
    layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError("activation checkpointing needs a model with a `layers` ModuleList")
    for i, block in enumerate(layers):
        layers[i] = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT,
                                       context_fn=_context)
    return len(layers)
