"""Apply every parallelism to a finished single-device model, in the fixed order
TP -> activation checkpointing -> compile -> FSDP.

The model may be on `meta` (sharded loading fills it afterwards) or hold real weights that are
identical on every rank.

FSDP is applied even over a single `dp_shard` rank (pure TP): then its all-gathers are local
copies, but every weight becomes a DTensor (one optimiser step over them all), the root's
weights are plain tensors between forward and backward (what the chunked loss ops need), and the
mixed-precision policy applies.
"""

from __future__ import annotations

import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh

from posttrain.config.parallel import ParallelConfig
from posttrain.parallel.checkpointing import apply_activation_checkpointing
from posttrain.parallel.compile import apply_compile
from posttrain.parallel.fsdp import apply_fsdp
from posttrain.parallel.mesh import DP_SHARD, TP
from posttrain.parallel.tp import apply_tp


def parallelize_model(
    model: nn.Module,
    mesh: DeviceMesh,
    cfg: ParallelConfig,
    *,
    activation_checkpointing: bool = False,
    compile: bool = False,
) -> nn.Module:
    """Parallelise `model` in place over `mesh` ("dp_shard", "tp") and return it."""
    if mesh[TP].size() > 1:
        apply_tp(model, mesh[TP])
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if compile:
        apply_compile(model)
    apply_fsdp(model, mesh[DP_SHARD], cfg.mixed_precision)
    return model
