"""`ParallelConfig`: how the ranks split the model (FSDP2 sharding x tensor parallelism)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from posttrain.config.base import Section

Dtype = Literal["float32", "bfloat16"]


class MixedPrecisionConfig(Section):
    """FSDP2 `MixedPrecisionPolicy`: the dtype blocks compute in and the one gradients are
    reduced in. The optimiser always steps the sharded weights in `model.dtype`."""

    param_dtype: Dtype | None = None
    """Dtype the all-gathered weights are cast to for forward/backward (`bfloat16` for bf16
    compute over fp32 master weights); null keeps the weights' own dtype."""

    reduce_dtype: Dtype | None = None
    """Dtype of the gradient reduce-scatter; null: `param_dtype` (use `float32` with bf16 params)."""


class ParallelConfig(Section):
    dp_shard: int = -1
    """Ranks the weights, gradients and optimiser state are sharded over (FSDP2); -1 takes every
    rank `tp` leaves. Data parallelism is this dimension: each `dp_shard` rank reads its own rows."""

    tp: int = Field(default=1, ge=1)
    """Tensor-parallel degree: attention heads and MLP columns split over this many ranks (keep it
    within one node). The ranks of one tensor-parallel group read the same rows."""

    mixed_precision: MixedPrecisionConfig = Field(default_factory=MixedPrecisionConfig)

    @field_validator("dp_shard")
    @classmethod
    def _check_dp_shard(cls, value: int) -> int:
        if value == 0 or value < -1:
            raise ValueError(f"must be a positive number of ranks or -1 (all remaining ranks), got {value}")
        return value

    def dp_shard_for(self, world_size: int) -> int:
        """The `dp_shard` degree for `world_size` ranks (resolving -1); ValueError when
        `dp_shard * tp` does not equal the world size."""
        if world_size % self.tp:
            raise ValueError(
                f"parallel.tp: {self.tp} does not divide the world size {world_size} "
                "(launcher.num_workers); pick a tp that divides it"
            )
        dp_shard = world_size // self.tp if self.dp_shard == -1 else self.dp_shard
        if dp_shard * self.tp != world_size:
            raise ValueError(
                f"parallel.dp_shard ({dp_shard}) * parallel.tp ({self.tp}) = {dp_shard * self.tp}, but "
                f"there are {world_size} ranks (launcher.num_workers); make the product equal the "
                "world size or set dp_shard: -1"
            )
        return dp_shard
