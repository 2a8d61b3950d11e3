"""FSDP2: shard every block, then the root (embedding, final norm, untied head), over `dp_shard`.

Each block is its own all-gather/reduce-scatter unit, so only one block's full weights exist at a
time. The root group holds what is left, including a tied embedding/head weight: the chunked
loss reads `model.head_weight` after the forward, while the root's weights are still gathered
(FSDP2 does not reshard the root after forward). Frozen weights (LoRA) are sharded like the
others and simply get no gradient.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from posttrain.config.parallel import MixedPrecisionConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def mixed_precision_policy(cfg: MixedPrecisionConfig) -> MixedPrecisionPolicy:
    param = DTYPES[cfg.param_dtype] if cfg.param_dtype else None
    reduce = DTYPES[cfg.reduce_dtype] if cfg.reduce_dtype else None
    return MixedPrecisionPolicy(param_dtype=param, reduce_dtype=reduce)


def apply_fsdp(model: nn.Module, dp_mesh: DeviceMesh, mixed_precision: MixedPrecisionConfig) -> None:
    """`fully_shard` each block of `model.layers`, then `model` itself (in place).

    The last block keeps its weights gathered after forward: backward starts with it.
    """
    policy = mixed_precision_policy(mixed_precision)
    layers = model.layers
    for i, block in enumerate(layers):
        fully_shard(block, mesh=dp_mesh, mp_policy=policy, reshard_after_forward=i < len(layers) - 1)
    fully_shard(model, mesh=dp_mesh, mp_policy=policy)


def reshard(model: nn.Module) -> None:
    """Put every FSDP2 unit of `model` back in its sharded state (a forward without a backward
    leaves the root gathered); nothing for a model without FSDP."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
