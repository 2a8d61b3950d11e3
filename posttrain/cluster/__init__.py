"""Starting SPMD ranks: `torch.distributed` set-up, Ray worker groups and fault-tolerant launch.

Generic by design: this package launches functions on ranks and knows nothing of models, data or
recipes.
"""

from posttrain.cluster.dist_env import DistEnv, destroy_distributed, find_free_port, init_distributed
from posttrain.cluster.launch import LaunchError, LaunchResult, RestartEvent, launch
from posttrain.cluster.ray_runtime import init_ray, ray_session
from posttrain.cluster.worker import RankSpec, TrainWorker, Worker, resolve_entrypoint
from posttrain.cluster.worker_group import RankFailure, WorkerGroup, WorkerGroupError

__all__ = [
    "DistEnv",
    "LaunchError",
    "LaunchResult",
    "RankFailure",
    "RankSpec",
    "RestartEvent",
    "TrainWorker",
    "Worker",
    "WorkerGroup",
    "WorkerGroupError",
    "destroy_distributed",
    "find_free_port",
    "init_distributed",
    "init_ray",
    "launch",
    "ray_session",
    "resolve_entrypoint",
]
