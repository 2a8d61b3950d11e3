"""The 2-D device mesh every parallelism is expressed on: ("dp_shard", "tp").

`dp_shard` is the data-parallel dimension (FSDP2 shards weights, gradients and optimiser state
over it, and each of its ranks reads its own rows); `tp` splits the blocks' matrices. Ranks are
laid out row-major, so the ranks of one tensor-parallel group are consecutive (on one node when
the launcher places a node's ranks together).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from posttrain.config.parallel import ParallelConfig

DP_SHARD = "dp_shard"
TP = "tp"


@dataclass(frozen=True)
class ParallelDims:
    """Resolved degrees of each mesh dimension."""

    dp_shard: int
    tp: int

    @classmethod
    def resolve(cls, cfg: ParallelConfig, world_size: int) -> ParallelDims:
        """ValueError (naming the config keys) when `dp_shard * tp != world_size`."""
        return cls(dp_shard=cfg.dp_shard_for(world_size), tp=cfg.tp)

    @property
    def world_size(self) -> int:
        return self.dp_shard * self.tp


def build_mesh(cfg: ParallelConfig, world_size: int, device_type: str = "cpu") -> DeviceMesh:
    """The ("dp_shard", "tp") mesh over `world_size` ranks; needs the default process group."""
    dims = ParallelDims.resolve(cfg, world_size)
    if not dist.is_initialized() or dist.get_world_size() != world_size:
        raise ValueError(f"build_mesh needs an initialised process group of {world_size} ranks")
    return init_device_mesh(device_type, (dims.dp_shard, dims.tp), mesh_dim_names=(DP_SHARD, TP))


def mesh_for_run(cfg: ParallelConfig, world_size: int, device: torch.device) -> DeviceMesh | None:
    """The mesh a run needs, or None when a plain single-device model does (one rank and no
    mixed-precision policy). Checks the degrees against the world size either way."""
    ParallelDims.resolve(cfg, world_size)
    mp = cfg.mixed_precision
    if world_size == 1 and mp.param_dtype is None and mp.reduce_dtype is None:
        return None
    return build_mesh(cfg, world_size, device.type)


@dataclass(frozen=True)
class DataParallel:
    """This rank's place among the data-parallel ranks, and their process group (None: the
    default group, or no group at all for a world of one)."""

    rank: int
    size: int
    group: dist.ProcessGroup | None = None


def data_parallel(mesh: DeviceMesh | None) -> DataParallel:
    """Data-parallel rank/size/group from the mesh; without a mesh, the whole world is data parallel."""
    if mesh is None:
        if dist.is_available() and dist.is_initialized():
            return DataParallel(dist.get_rank(), dist.get_world_size(), None)
        return DataParallel(0, 1, None)
    dp = mesh[DP_SHARD]
    return DataParallel(dp.get_local_rank(), dp.size(), dp.get_group())
