"""`torch.compile` per transformer block: each block compiles once and the graph is reused by all."""

from __future__ import annotations

import torch
import torch.nn as nn


def apply_compile(model: nn.Module, *, dynamic: bool = False) -> int:
    """Compile every block in `model.layers` in place; returns how many were compiled.

    Blocks share one architecture, so the compiled code is shared too; compiling per block
    rather than the whole model keeps graph breaks local and composes with FSDP2's per-block
    wrapping.
    """
    layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError("compile needs a model with a `layers` ModuleList")
    for block in layers:
        block.compile(dynamic=dynamic, fullgraph=False)
    return len(layers)
