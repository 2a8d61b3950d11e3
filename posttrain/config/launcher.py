"""`LauncherConfig`: how the SPMD workers are started (read by `posttrain.cluster`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from posttrain.config.base import FieldError, Section


class LauncherConfig(Section):
    backend: Literal["local", "ray"] = "local"
    """`local`: this process is the (only) rank, or one rank of a `torchrun` world; `ray`: a Ray
    worker group. Left out, it is `ray` when `num_workers` > 1."""

    num_workers: int = Field(default=1, ge=1)
    """Training ranks (the world size)."""

    cpus_per_worker: float = Field(default=1.0, gt=0)
    gpus_per_worker: float = Field(default=0.0, ge=0)
    address: str | None = None
    """Ray cluster address (`auto`, `host:port`, `ray://host:port`); null starts a local Ray
    instance (or joins the one `RAY_ADDRESS` names, as under `ray job submit`)."""

    placement_strategy: Literal["PACK", "STRICT_PACK", "SPREAD", "STRICT_SPREAD"] = "PACK"
    """How the workers' bundles are gang-scheduled: `PACK` fills as few nodes as it can,
    `STRICT_PACK` demands one node."""

    placement_timeout_s: float = Field(default=300.0, gt=0)
    """How long to wait for the cluster to fit all workers before giving up."""

    master_port: int | None = Field(default=None, ge=1, le=65535)
    """Rendezvous port on rank 0's node; null picks a free one at every (re)start."""

    max_restarts: int = Field(default=0, ge=0)
    """Times a failed worker group is restarted from the newest checkpoint."""

    restart_backoff_s: float = Field(default=0.0, ge=0)
    """Pause before each restart (lets a cluster replace a lost node)."""

    working_dir: str | None = None
    """Directory Ray uploads to every worker (`runtime_env.working_dir`), for clusters whose nodes
    do not share this checkout; null: workers import the project from the driver's `PYTHONPATH`."""

    @model_validator(mode="after")
    def _check(self) -> LauncherConfig:
        if "backend" not in self.model_fields_set and self.num_workers > 1:
            self.backend = "ray"  # saved resolved
        if self.backend == "local":
            for name in ("address", "master_port", "working_dir"):
                if getattr(self, name) is not None:
                    raise FieldError(name, "only used with launcher.backend: ray")
            if self.num_workers > 1:
                raise FieldError(
                    "num_workers",
                    "backend: local runs one rank in this process; use launcher.backend: ray "
                    "for more workers, or start the ranks with torchrun",
                )
        return self
