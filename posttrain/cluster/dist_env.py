"""`init_distributed`: one entry into `torch.distributed` for every way a rank can be started.

    env = init_distributed()      # under torchrun, a Ray worker group, or a plain `python`
    ...                           # SPMD code: env.rank, env.world_size, env.device
    destroy_distributed()

Where the process group comes from, first match wins:
1. one is already initialised (a Ray worker set it up, or the caller did): describe it;
2. torchrun-style environment (`RANK`, `WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`, `LOCAL_RANK`):
   join that world through the `env://` rendezvous;
3. nothing: a world of one, rendezvous through an in-process store (no port, no network).

Backend: `gloo` on CPU; on a rank with a GPU, `cuda:nccl,cpu:gloo` so collectives on CUDA tensors
use NCCL and the occasional CPU-tensor collective (a flag, a count) still works.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

GPU_BACKEND = "cuda:nccl,cpu:gloo"
CPU_BACKEND = "gloo"


@dataclass(frozen=True)
class DistEnv:
    """This rank's place in the world and the device its tensors live on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    local_world_size: int = 1
    backend: str = CPU_BACKEND

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that logs, writes metrics and exports."""
        return self.rank == 0


def default_backend() -> str:
    """NCCL (with gloo for CPU tensors) when this process sees a GPU, else gloo."""
    return GPU_BACKEND if torch.cuda.is_available() else CPU_BACKEND


def find_free_port(host: str = "") -> int:
    """A TCP port that was free a moment ago (the caller binds it soon after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _env_int(name: str, default: int | None = None) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        if default is None:
            raise ValueError(f"environment variable {name} is not set")
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def _uses_cuda(backend: str) -> bool:
    return "nccl" in backend


def _resolve_device(backend: str, local_rank: int, device: torch.device | str | None) -> torch.device:
    if device is not None:
        device = torch.device(device)
    elif _uses_cuda(backend):
        device = torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
    else:
        return torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def _describe(device: torch.device | str | None) -> DistEnv:
    """The `DistEnv` of the process group that is already initialised."""
    backend = str(dist.get_backend())
    rank, world_size = dist.get_rank(), dist.get_world_size()
    local_rank = _env_int("LOCAL_RANK", 0)
    if device is None and _uses_cuda(backend):
        device = torch.device("cuda", torch.cuda.current_device())
    return DistEnv(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        device=_resolve_device(backend, local_rank, device),
        local_world_size=_env_int("LOCAL_WORLD_SIZE", world_size),
        backend=backend,
    )


def init_distributed(
    backend: str | None = None,
    *,
    device: torch.device | str | None = None,
    timeout: timedelta | None = None,
) -> DistEnv:
    """Join (or form) this process's `torch.distributed` world and return its `DistEnv`.

    `backend` None picks `default_backend()`. `device` overrides the default device choice
    (`cuda:LOCAL_RANK` for NCCL, else CPU), for launchers whose ranks see GPUs in another order.
    Calling it again while the group is up just describes the group.
    """
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed")
    if dist.is_initialized():
        return _describe(device)
    backend = backend or default_backend()
    kwargs = {"timeout": timeout} if timeout is not None else {}
    if "RANK" in os.environ or "WORLD_SIZE" in os.environ:
        rank, world_size = _env_int("RANK"), _env_int("WORLD_SIZE")
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if not os.environ.get(name):
                raise ValueError(f"RANK and WORLD_SIZE are set but {name} is not (torchrun sets all)")
        local_rank = _env_int("LOCAL_RANK", 0)
        env_device = _resolve_device(backend, local_rank, device)  # before NCCL comes up
        dist.init_process_group(
            backend, init_method="env://", rank=rank, world_size=world_size, **kwargs
        )
        local_world_size = _env_int("LOCAL_WORLD_SIZE", world_size)
    else:
        rank, world_size, local_rank, local_world_size = 0, 1, 0, 1
        env_device = _resolve_device(backend, 0, device)
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, **kwargs)
    return DistEnv(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        device=env_device,
        local_world_size=local_world_size,
        backend=backend,
    )


def destroy_distributed() -> None:
    """Tear down the default process group, if there is one (safe to call twice)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
