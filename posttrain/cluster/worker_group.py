"""`WorkerGroup`: N gang-scheduled Ray actors of one role that form one `torch.distributed` world.

    group = WorkerGroup(launcher_cfg, TrainWorker)          # placement group, actors, rendezvous
    per_rank = group.run(fn, *args)                         # fn(*args) on every rank (SPMD)
    per_rank = group.call("run_entry", entry, payload, 0)   # a role's coarse method on every rank
    group.shutdown()                                        # kill actors, free the placement group

Several groups (train, rollout, reward) can live side by side under one driver; `call_async`
returns Ray object refs, which can be handed to another group's method unresolved, so data (e.g.
weights) moves worker to worker through the object store rather than through the driver.

A failure (a rank raised, or its process/node died) surfaces as `WorkerGroupError` as soon as the
driver sees it; peers blocked in a collective are not waited for. The group is then unusable:
shut it down and build a new one (that is what `launch` does).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any, Literal

import ray
from ray.exceptions import RayError, RayTaskError
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from posttrain.cluster.dist_env import DistEnv
from posttrain.cluster.ray_runtime import worker_runtime_env
from posttrain.cluster.worker import Entrypoint, NodeInfo, RankSpec, TrainWorker, Worker
from posttrain.config.launcher import LauncherConfig

logger = logging.getLogger("posttrain.cluster")

FAILURE_GRACE_S = 1.0
"""After a rank raises, how long to wait for other ranks' results before reporting: a killed peer
often makes the survivors raise first, and the death is the cause worth reporting."""


@dataclass(frozen=True)
class RankFailure:
    """What went wrong on one rank."""

    rank: int
    role: str
    kind: Literal["error", "died"]
    """`error`: the code raised; `died`: the actor's process or node is gone."""
    error_type: str
    message: str
    traceback: str = field(repr=False)
    """The remote traceback text (or Ray's account of the death)."""

    def summary(self) -> str:
        verb = "raised" if self.kind == "error" else "died:"
        first_line = self.message.strip().splitlines()[0] if self.message.strip() else ""
        return f"{self.role} rank {self.rank} {verb} {self.error_type}: {first_line}"


class WorkerGroupError(RuntimeError):
    """One or more ranks of a group failed; `failure` is the likely cause, `failures` all seen."""

    def __init__(self, failures: list[RankFailure]):
        assert failures
        self.failures = failures
        self.failure = pick_cause(failures)
        super().__init__(f"{self.failure.summary()}\n{self.failure.traceback}")


def pick_cause(failures: list[RankFailure]) -> RankFailure:
    """A dead rank explains its peers' collective errors; else the lowest rank's error."""
    return min(failures, key=lambda f: (f.kind != "died", f.rank))


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def remote_traceback(err: RayTaskError, rank: int, role: str) -> str:
    """Ray's rendering of a remote traceback, as a plain Python traceback naming the rank.

    Ray puts `ray::Class.method() (pid=..., ip=...)` first and leaves caret lines of the frames it
    hides; this drops the colour codes and those orphan carets.
    """
    lines = _ANSI.sub("", str(err)).splitlines()
    where = lines[0] if lines else ""
    body = lines[1:]
    while body and not body[0].strip(" ^"):
        body.pop(0)
    return "\n".join([f"Traceback (most recent call last), {role} rank {rank}: {where}", *body])


def describe_failure(err: Exception, rank: int, role: str) -> RankFailure:
    if isinstance(err, RayTaskError):
        cause = err.cause if isinstance(err.cause, BaseException) else err
        text = remote_traceback(err, rank, role)
        return RankFailure(rank, role, "error", type(cause).__name__, str(cause), text)
    kind: Literal["error", "died"] = "died" if isinstance(err, RayError) else "error"
    return RankFailure(rank, role, kind, type(err).__name__, str(err), str(err))


@cache
def _actor_class(worker_cls: type[Worker]) -> Any:
    return ray.remote(worker_cls)


def assign_ranks(infos: Sequence[NodeInfo]) -> list[int]:
    """Actor indices in rank order: node by node (in order of first appearance), by GPU within a
    node, so a node's ranks are consecutive (intra-node groups such as TP stay on one node)."""
    node_order = {node: i for i, node in enumerate(dict.fromkeys(info.node_id for info in infos))}

    def key(i: int) -> tuple:
        info = infos[i]
        first_gpu = min((int(g) for g in info.gpu_ids if g.isdigit()), default=-1)
        return node_order[info.node_id], first_gpu, i

    return sorted(range(len(infos)), key=key)


def rank_specs(infos: Sequence[NodeInfo], master_addr: str, master_port: int) -> list[RankSpec]:
    """One `RankSpec` per rank (`infos` already in rank order).

    Ranks on a node share one `CUDA_VISIBLE_DEVICES` (the union of their GPUs) so NCCL sees its
    intra-node peers; each rank's device is its own first GPU's position in that list. Ranks
    without GPUs see none (CPU, gloo).
    """
    by_node: dict[str, list[int]] = {}
    for rank, info in enumerate(infos):
        by_node.setdefault(info.node_id, []).append(rank)
    specs = []
    for rank, info in enumerate(infos):
        peers = by_node[info.node_id]
        node_gpus = sorted({g for r in peers for g in infos[r].gpu_ids}, key=_gpu_sort_key)
        visible, device = "", None  # a rank Ray gave no GPU must not pick one up by default
        if info.gpu_ids:
            visible = ",".join(node_gpus)
            device = f"cuda:{node_gpus.index(min(info.gpu_ids, key=_gpu_sort_key))}"
        specs.append(
            RankSpec(
                rank=rank,
                world_size=len(infos),
                local_rank=peers.index(rank),
                local_world_size=len(peers),
                master_addr=master_addr,
                master_port=master_port,
                cuda_visible_devices=visible,
                device=device,
            )
        )
    return specs


def _gpu_sort_key(gpu_id: str) -> tuple[int, str]:
    return (int(gpu_id), "") if gpu_id.isdigit() else (1 << 30, gpu_id)


class WorkerGroup:
    """`cfg.num_workers` actors of `worker_cls`, one per rank, in one placement group."""

    def __init__(
        self,
        cfg: LauncherConfig,
        worker_cls: type[Worker] = TrainWorker,
        *,
        form_process_group: bool = True,
        env_vars: dict[str, str] | None = None,
        setup_timeout_s: float = 300.0,
    ):
        """Start the actors and (unless `form_process_group` is False) join them into one world.

        `env_vars` are exported on every worker before anything runs there. Ray must be up
        (`init_ray`). Raises `TimeoutError` when the cluster can't fit the group in
        `cfg.placement_timeout_s`, `WorkerGroupError` when a worker fails while starting.
        """
        if not ray.is_initialized():
            raise RuntimeError("Ray is not initialised: call posttrain.cluster.ray_runtime.init_ray first")
        self.cfg = cfg
        self.role = worker_cls.role
        self.world_size = cfg.num_workers
        self.actors: list[Any] = []
        self.envs: list[DistEnv | None] = [None] * self.world_size
        self._pg: PlacementGroup | None = None
        self._broken = False
        try:
            self._pg = self._reserve()
            self._start(worker_cls, env_vars, setup_timeout_s)
            if form_process_group:
                self._rendezvous(setup_timeout_s)
        except BaseException:
            self.shutdown(graceful=False)
            raise

    # -- start-up --------------------------------------------------------------------------

    def _bundle(self) -> dict[str, float]:
        bundle = {"CPU": self.cfg.cpus_per_worker}
        if self.cfg.gpus_per_worker > 0:
            bundle["GPU"] = self.cfg.gpus_per_worker
        return bundle

    def _reserve(self) -> PlacementGroup:
        bundles = [self._bundle() for _ in range(self.world_size)]
        pg = placement_group(bundles, strategy=self.cfg.placement_strategy)
        if not pg.wait(timeout_seconds=self.cfg.placement_timeout_s):
            remove_placement_group(pg)
            raise TimeoutError(
                f"the Ray cluster could not fit {self.world_size} {self.role} workers of "
                f"{bundles[0]} ({self.cfg.placement_strategy}) within "
                f"{self.cfg.placement_timeout_s:.0f}s; it has {ray.available_resources()} free. "
                "Lower launcher.num_workers / cpus_per_worker / gpus_per_worker or add nodes."
            )
        return pg

    def _start(
        self, worker_cls: type[Worker], env_vars: dict[str, str] | None, timeout_s: float
    ) -> None:
        actor_cls = _actor_class(worker_cls)
        actors = [
            actor_cls.options(
                num_cpus=self.cfg.cpus_per_worker,
                num_gpus=self.cfg.gpus_per_worker,
                max_restarts=0,  # the group restarts as a whole (launch), never one rank
                max_task_retries=0,
                runtime_env=worker_runtime_env(self.cfg, env_vars),
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=self._pg, placement_group_bundle_index=i
                ),
            ).remote()
            for i in range(self.world_size)
        ]
        self.actors = actors  # bundle order until ranks are known, so shutdown can reach them
        infos = self._gather([a.node_info.remote() for a in actors], timeout_s=timeout_s)
        order = assign_ranks(infos)
        self.actors = [actors[i] for i in order]
        self.node_infos: list[NodeInfo] = [infos[i] for i in order]

    def _rendezvous(self, timeout_s: float) -> None:
        master_addr = self.node_infos[0].ip
        port = self.cfg.master_port or self.get(self.actors[0].free_port.remote())
        specs = rank_specs(self.node_infos, master_addr, port)
        refs = [a.setup.remote(spec) for a, spec in zip(self.actors, specs)]
        self.envs = self._gather(refs, timeout_s=timeout_s)
        nodes = len({info.node_id for info in self.node_infos})
        logger.info(
            "%s group: %d ranks on %d node(s), backend %s, rendezvous %s:%d",
            self.role, self.world_size, nodes, self.envs[0].backend, master_addr, port,
        )

    # -- calls -----------------------------------------------------------------------------

    def call_async(self, method: str, *args: Any, **kwargs: Any) -> list[ray.ObjectRef]:
        """Start `method(*args, **kwargs)` on every rank; one object ref per rank."""
        self._check_usable()
        return [getattr(actor, method).remote(*args, **kwargs) for actor in self.actors]

    def call(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        """`method(*args, **kwargs)` on every rank; the results in rank order."""
        return self._gather(self.call_async(method, *args, **kwargs))

    def call_per_rank(self, method: str, per_rank_args: Sequence[tuple]) -> list[Any]:
        """`method(*per_rank_args[r])` on rank r (e.g. each rank its shard of a batch)."""
        self._check_usable()
        if len(per_rank_args) != self.world_size:
            raise ValueError(f"{len(per_rank_args)} argument tuples for {self.world_size} ranks")
        refs = [getattr(a, method).remote(*args) for a, args in zip(self.actors, per_rank_args)]
        return self._gather(refs)

    def run(self, fn: Entrypoint, *args: Any, **kwargs: Any) -> list[Any]:
        """`fn(*args, **kwargs)` on every rank (SPMD); the results in rank order."""
        return self.call("run", fn, args, kwargs)

    def get(self, refs: ray.ObjectRef | list[ray.ObjectRef]) -> Any:
        """Resolve refs from `call_async`, failing fast like `call`."""
        if isinstance(refs, list):
            return self._gather(refs)
        return self._gather([refs])[0]

    def _check_usable(self) -> None:
        if self._broken or not self.actors:
            raise RuntimeError(f"the {self.role} group failed or was shut down; start a new one")

    def _gather(self, refs: list[ray.ObjectRef], timeout_s: float | None = None) -> list[Any]:
        """Results in order; on the first failure, wait `FAILURE_GRACE_S` for more, then raise."""
        index = {ref: i for i, ref in enumerate(refs)}
        results: list[Any] = [None] * len(refs)
        failures: list[RankFailure] = []
        pending = list(refs)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while pending:
            wait_s = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            ready, pending = ray.wait(pending, num_returns=1, timeout=wait_s)
            if not ready:
                if failures:
                    break
                self._broken = True
                raise TimeoutError(f"{self.role} group: no result within {timeout_s:.0f}s")
            ref = ready[0]
            try:
                results[index[ref]] = ray.get(ref)
            except Exception as err:
                failures.append(describe_failure(err, index[ref], self.role))
                if failures[-1].kind == "died":
                    break  # the root cause is in hand; peers may hang in collectives
                if len(failures) == 1:  # give a dying peer a moment to be reported
                    grace_end = time.monotonic() + FAILURE_GRACE_S
                    deadline = grace_end if deadline is None else min(deadline, grace_end)
        if failures:
            self._broken = True
            raise WorkerGroupError(failures)
        return results

    # -- teardown --------------------------------------------------------------------------

    def shutdown(self, graceful: bool = True, timeout_s: float = 10.0) -> None:
        """Kill the actors and free the placement group (idempotent).

        `graceful` first lets healthy ranks leave their process group cleanly.
        """
        if graceful and self.actors and not self._broken:
            refs = [a.teardown.remote() for a in self.actors]
            ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        for actor in self.actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # already gone
                pass
        self.actors = []
        if self._pg is not None:
            try:
                remove_placement_group(self._pg)
            except Exception:
                pass
            self._pg = None

    def __enter__(self) -> WorkerGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown(graceful=exc[0] is None)
