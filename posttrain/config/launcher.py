"""`LauncherConfig`: how the SPMD workers are started (validated now, used by the cluster layer)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from posttrain.config.base import FieldError, Section


class LauncherConfig(Section):
    backend: Literal["local", "ray"] = "local"
    """`local`: processes on this machine; `ray`: a Ray worker group."""

    num_workers: int = Field(default=1, ge=1)
    """Training ranks (the world size)."""

    cpus_per_worker: float = Field(default=1.0, gt=0)
    gpus_per_worker: float = Field(default=0.0, ge=0)
    address: str | None = None
    """Ray cluster address (`auto`, `ray://host:port`); null starts a local Ray instance."""

    max_restarts: int = Field(default=0, ge=0)
    """Times a failed worker group is restarted from the newest checkpoint."""

    @model_validator(mode="after")
    def _check(self) -> LauncherConfig:
        if self.backend == "local" and self.address is not None:
            raise FieldError("address", "only used with launcher.backend: ray")
        return self
