"""Worker actors: one class per role, each instance one rank of a `WorkerGroup`.

A role subclasses `Worker` and adds *coarse* methods: one call does a whole unit of work (a training
run, a generation over a batch, a weight update) and takes/returns plain picklable values
(dataclasses, tensors, lists). The driver decides what runs when; workers never call each other
except through `torch.distributed` collectives inside a group.

These are plain classes; `WorkerGroup` turns them into Ray actors, so they can be subclassed and
unit-tested without Ray.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from posttrain.cluster.dist_env import DistEnv, destroy_distributed, find_free_port, init_distributed

DRIVER_CWD_VAR = "POSTTRAIN_DRIVER_CWD"
"""Set by the driver (`ray_runtime.worker_runtime_env`): its working directory."""

Entrypoint = Callable[..., Any] | str
"""A callable, or `"package.module:function"` imported on the worker."""


def resolve_entrypoint(fn: Entrypoint) -> Callable[..., Any]:
    """The callable `fn` names (`"pkg.mod:func"` or `"pkg.mod:Class.method"`), or `fn` itself."""
    if callable(fn):
        return fn
    module_name, sep, attr_path = fn.partition(":")
    if not sep or not module_name or not attr_path:
        raise ValueError(f"entrypoint {fn!r}: expected 'package.module:function'")
    target: Any = importlib.import_module(module_name)
    for attr in attr_path.split("."):
        target = getattr(target, attr)
    if not callable(target):
        raise ValueError(f"entrypoint {fn!r} is not callable")
    return target


@dataclass(frozen=True)
class NodeInfo:
    """Where a freshly started actor landed (reported before ranks are assigned)."""

    node_id: str
    ip: str
    gpu_ids: tuple[str, ...]
    pid: int


@dataclass(frozen=True)
class RankSpec:
    """What the driver tells each actor: its rank and how to reach rank 0."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    cuda_visible_devices: str | None = None
    """All GPUs the group holds on this node (set before CUDA starts), so NCCL sees its peers;
    `""` for a CPU rank; None leaves the variable alone."""
    device: str | None = None
    """This rank's device within `cuda_visible_devices` (`cuda:i`); None: CPU / default."""


class Worker:
    """Base of every role: reports its placement, joins the group's process group, runs functions."""

    role = "worker"

    def __init__(self) -> None:
        self.env: DistEnv | None = None
        driver_cwd = os.environ.get(DRIVER_CWD_VAR)
        if driver_cwd and os.path.isdir(driver_cwd):  # same machine or a shared filesystem
            os.chdir(driver_cwd)

    def node_info(self) -> NodeInfo:
        import ray

        context = ray.get_runtime_context()
        gpu_ids = context.get_accelerator_ids().get("GPU", [])
        return NodeInfo(
            node_id=context.get_node_id(),
            ip=ray.util.get_node_ip_address(),
            gpu_ids=tuple(str(g) for g in gpu_ids),
            pid=os.getpid(),
        )

    def free_port(self) -> int:
        """A free port on this actor's node (asked of rank 0 for the rendezvous)."""
        return find_free_port()

    def setup(self, spec: RankSpec) -> DistEnv:
        """Export the torchrun-style environment for `spec` and join the process group."""
        os.environ.update(
            RANK=str(spec.rank),
            WORLD_SIZE=str(spec.world_size),
            LOCAL_RANK=str(spec.local_rank),
            LOCAL_WORLD_SIZE=str(spec.local_world_size),
            MASTER_ADDR=spec.master_addr,
            MASTER_PORT=str(spec.master_port),
        )
        if spec.cuda_visible_devices is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = spec.cuda_visible_devices
        self.env = init_distributed(device=spec.device)
        return self.env

    def run(self, fn: Entrypoint, args: tuple = (), kwargs: dict | None = None) -> Any:
        """Call `fn(*args, **kwargs)` here (the SPMD step: every rank calls the same function)."""
        return resolve_entrypoint(fn)(*args, **(kwargs or {}))

    def teardown(self) -> None:
        destroy_distributed()
        self.env = None


class TrainWorker(Worker):
    """The train role: runs a recipe's SPMD entry function on its rank."""

    role = "train"

    def run_entry(self, entry: Entrypoint, payload: Any, attempt: int) -> Any:
        """`entry(payload, dist_env, attempt)`: the whole training run of one attempt on this rank."""
        env = self.env if self.env is not None else init_distributed()
        return resolve_entrypoint(entry)(payload, env, attempt)
