"""Starting SPMD ranks: `torch.distributed` set-up, Ray worker groups and fault-tolerant launch.

Generic by design: this package launches functions on ranks and knows nothing of models, data or
recipes. Importing it does not import Ray: `launch` (`posttrain.cluster.launch`), `WorkerGroup`
(`posttrain.cluster.worker_group`) and `init_ray` (`posttrain.cluster.ray_runtime`) come from their
modules, so a local run never pays Ray's import time or needs it installed.
"""

from posttrain.cluster.dist_env import DistEnv, destroy_distributed, find_free_port, init_distributed
from posttrain.cluster.worker import RankSpec, TrainWorker, Worker, resolve_entrypoint

__all__ = [
    "DistEnv",
    "RankSpec",
    "TrainWorker",
    "Worker",
    "destroy_distributed",
    "find_free_port",
    "init_distributed",
    "resolve_entrypoint",
]
