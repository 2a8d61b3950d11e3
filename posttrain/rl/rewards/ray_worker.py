"""`RayWorker`: a reward worker as a Ray actor (the Ray backend's `_Worker`, same protocol).

The actor runs on the calling rank's node without reserving CPUs (rewards are short calls that
run while the trainer waits). A call that outlives its deadline, or whose actor died, kills the
actor; the next call starts a fresh one, as with worker processes.
"""

from __future__ import annotations

import os
import time
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from posttrain.rl.rewards.workers import START_TIMEOUT_S, RewardBatch, answer


class RewardActor:
    def pid(self) -> int:
        return os.getpid()

    def call(self, fn: str, kwargs: dict, batch: RewardBatch) -> tuple[str, Any]:
        return answer(fn, kwargs, batch)


class RayWorker:
    def __init__(self):
        self.actor, self._pending, self.pid = None, None, None

    def start(self) -> None:
        node = ray.get_runtime_context().get_node_id()
        self.actor = ray.remote(RewardActor).options(
            num_cpus=0, max_restarts=0, max_task_retries=0, name=f"posttrain-reward-{os.urandom(6).hex()}",
            scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=True)).remote()
        try:
            self.pid = ray.get(self.actor.pid.remote(), timeout=START_TIMEOUT_S)  # ready before any deadline runs
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            self.stop()
            raise RuntimeError(f"a reward actor did not start within {START_TIMEOUT_S} s") from None

    def stop(self) -> None:
        if self.actor is not None:
            ray.kill(self.actor, no_restart=True)
        self.actor, self._pending = None, None

    def send(self, request: tuple) -> None:
        if self.actor is None:
            self.start()
        self._pending = self.actor.call.remote(*request)

    def receive(self, deadline: float, what: str) -> list[dict[str, float]]:
        ready, _ = ray.wait([self._pending], timeout=max(0.0, deadline - time.monotonic()))
        if not ready:
            self.stop()  # the hung call dies with its actor; the next call starts a fresh one
            raise TimeoutError(f"{what} did not return in time")
        try:
            status, value = ray.get(self._pending)
        except ray.exceptions.RayActorError:
            self.stop()
            raise RuntimeError(f"the worker running {what} died") from None
        finally:
            self._pending = None
        if status == "error":
            raise RuntimeError(value)
        return value
