"""`launch`: run a recipe's SPMD entry on every rank, restarting the whole group when a rank fails.

    def entry(cfg, env: DistEnv, attempt: int) -> dict:   # runs on every rank
        ...                                                # resumes from its newest checkpoint
    result = launch(entry, cfg, cfg.launcher)              # LaunchResult(results, restarts, ...)

`backend: local` calls `entry` in this process (world size 1, or this rank of a `torchrun` world).
`backend: ray` starts a `WorkerGroup` of `TrainWorker`s and calls `entry(payload, env, attempt)` on
each. If any rank raises or dies, the group is torn down (actors killed, placement group removed),
a new one is built and `entry` runs again with `attempt + 1`, at most `max_restarts` times; the
entry is expected to resume from its newest complete checkpoint. Restarting is blind to the cause:
a deterministic error fails `max_restarts + 1` times, then `LaunchError` carries its traceback.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch.distributed as dist

from posttrain.cluster.dist_env import DistEnv, destroy_distributed, init_distributed
from posttrain.cluster.worker import Entrypoint, TrainWorker, resolve_entrypoint
from posttrain.config.launcher import LauncherConfig

if TYPE_CHECKING:
    from posttrain.cluster.worker_group import RankFailure, WorkerGroup

logger = logging.getLogger("posttrain.cluster")

EntryFn = Callable[[Any, DistEnv, int], Any]
"""`entry(payload, dist_env, attempt) -> result`, run on every rank."""


@dataclass(frozen=True)
class RestartEvent:
    """Passed to `on_restart` just before a failed group is rebuilt."""

    restart: int
    """1 for the first restart."""
    max_restarts: int
    failure: RankFailure
    """Why the previous attempt failed."""

    def message(self) -> str:
        return (
            f"{self.failure.summary()}; restarting the {self.failure.role} group "
            f"(restart {self.restart} of at most {self.max_restarts})"
        )


@dataclass
class LaunchResult:
    results: list[Any]
    """`entry`'s return value per rank, in rank order (one item for `backend: local`)."""
    restarts: int = 0
    failures: list[RankFailure] = field(default_factory=list)
    """The cause of each failed attempt, oldest first (`len(failures) == restarts`)."""

    @property
    def main(self) -> Any:
        """Rank 0's result."""
        return self.results[0]


class LaunchError(RuntimeError):
    """Every attempt failed; `failures` holds each attempt's cause, the last one in the message."""

    def __init__(self, failures: list[RankFailure], max_restarts: int):
        self.failures = failures
        last = failures[-1]
        attempts = len(failures)
        history = "".join(f"\n  attempt {i}: {f.summary()}" for i, f in enumerate(failures))
        super().__init__(
            f"run failed on all {attempts} attempt(s) (launcher.max_restarts: {max_restarts})"
            f"{history}\nlast failure, {last.summary()}\n{last.traceback}"
        )


def launch(
    entry: EntryFn | str,
    payload: Any,
    launcher: LauncherConfig,
    *,
    on_restart: Callable[[RestartEvent], None] | None = None,
    worker_cls: type[TrainWorker] = TrainWorker,
    env_vars: dict[str, str] | None = None,
) -> LaunchResult:
    """Run `entry(payload, dist_env, attempt)` on `launcher.num_workers` ranks (see module doc).

    `entry` is a picklable function or a `"package.module:function"` string; `payload` (e.g. the
    resolved recipe config) is sent once to every rank. `env_vars` are exported on Ray workers.
    Ray is started for the call when it is not up (`launcher.address`), and stopped after.
    """
    if launcher.backend == "local":  # Ray is imported by the Ray backend only
        return _launch_local(entry, payload)
    from posttrain.cluster.ray_runtime import ray_session

    with ray_session(launcher):
        return _launch_ray(entry, payload, launcher, on_restart, worker_cls, env_vars)


def _launch_local(entry: Entrypoint, payload: Any) -> LaunchResult:
    owns_group = not (dist.is_available() and dist.is_initialized())
    env = init_distributed()
    try:
        result = resolve_entrypoint(entry)(payload, env, 0)
    finally:
        if owns_group:
            destroy_distributed()
    return LaunchResult(results=[result])


def _launch_ray(
    entry: Entrypoint,
    payload: Any,
    cfg: LauncherConfig,
    on_restart: Callable[[RestartEvent], None] | None,
    worker_cls: type[TrainWorker],
    env_vars: dict[str, str] | None,
) -> LaunchResult:
    import ray

    from posttrain.cluster.worker_group import WorkerGroup, WorkerGroupError

    payload_ref = ray.put(payload)  # serialised once, fetched by every rank of every attempt
    failures: list[RankFailure] = []
    for attempt in range(cfg.max_restarts + 1):
        group: WorkerGroup | None = None
        try:
            group = WorkerGroup(cfg, worker_cls, env_vars=env_vars)
            results = group.call("run_entry", entry, payload_ref, attempt)
            group.shutdown()  # graceful: ranks leave their process group before the actors go
            return LaunchResult(results=results, restarts=attempt, failures=failures)
        except WorkerGroupError as err:
            failures.append(err.failure)
            if attempt == cfg.max_restarts:
                raise LaunchError(failures, cfg.max_restarts) from err
            event = RestartEvent(restart=attempt + 1, max_restarts=cfg.max_restarts, failure=err.failure)
            logger.warning("%s", event.message())
            if on_restart is not None:
                on_restart(event)
            if cfg.restart_backoff_s > 0:
                time.sleep(cfg.restart_backoff_s)
        finally:  # failed, interrupted or done: no actor or reservation outlives its attempt
            if group is not None:
                group.shutdown(graceful=False)
    raise AssertionError("unreachable")
