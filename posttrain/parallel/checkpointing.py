"""Activation checkpointing per transformer block: keep block inputs, recompute the rest in backward."""

from __future__ import annotations

import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    checkpoint_wrapper,
)


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Wrap every block in `model.layers` (in place); returns how many were wrapped.

    Non-reentrant checkpointing, so it composes with `torch.compile`, FSDP2 and frozen (LoRA)
    weights. The wrapper keeps the wrapped block's state-dict keys unchanged.
    """
    layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError("activation checkpointing needs a model with a `layers` ModuleList")
    for i, block in enumerate(layers):
        layers[i] = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
    return len(layers)
