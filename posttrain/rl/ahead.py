"""`rollout.async`: the next rollout generates in a background thread while the trainer updates.

    step k:   take rollout k (made with the weights before update k-1) -> push weights v_k ->
              start rollout k+1 in the background with v_k -> train on rollout k

The background thread only draws prompts, talks to the engine and the reward workers and
computes group advantages: nothing collective (weights are gathered and pushed on the trainer's
thread before it starts; agreeing across ranks, the teacher's and the old log-probs run when the
rollout is taken). A checkpoint waits for the rollout in flight and stores it (`Produced`), so a
resumed run trains on exactly what an uninterrupted one would; rewinding a step (a stop signal
while a rollout is taken) drops the one in flight and restores the prompt stream to before it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

from posttrain.data.batch import Sample
from posttrain.rl.rollout_metrics import RolloutStats
from posttrain.rollout.process_engine import EngineDied


@dataclass
class Produced:
    """One rank's rollout before any collective: groups kept, groups dynamic sampling dropped
    (the last round's), the rollout's statistics and the policy version it was generated with."""

    groups: list[list[Sample]]
    dropped: list[list[Sample]]
    stats: RolloutStats
    version: int

    def to_dict(self) -> dict[str, Any]:
        return {"groups": [[s.to_dict() for s in g] for g in self.groups],
                "dropped": [[s.to_dict() for s in g] for g in self.dropped],
                "stats": asdict(self.stats), "version": self.version}

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> Produced:
        def groups(key: str) -> list[list[Sample]]:
            return [[Sample.from_dict(s) for s in g] for g in state[key]]

        return cls(groups("groups"), groups("dropped"), RolloutStats(**state["stats"]), int(state["version"]))


class RolloutAhead:
    def __init__(self, generate: Callable[[RolloutStats, int], Produced]):
        """`generate(stats, version)` makes a rollout with the engine's current weights."""
        self._generate = generate
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="posttrain-rollout-ahead")
        self._future: Future | None = None
        self._prompts_before: dict | None = None  # the prompt stream before the rollout in flight drew
        self._ready: Produced | None = None  # waited for by a checkpoint, or restored from one
        self._thread = threading.local()

    def in_background(self) -> bool:
        return getattr(self._thread, "ahead", False)

    def _run(self, stats: RolloutStats, version: int) -> Produced:
        self._thread.ahead = True
        return self._generate(stats, version)

    def start(self, stats: RolloutStats, version: int, prompts_before: dict) -> None:
        self._prompts_before = prompts_before
        self._future = self._executor.submit(self._run, stats, version)

    def take(self, regenerate: Callable[[dict], Produced]) -> Produced | None:
        """The rollout made ahead (None before the first one started). If the engine died while
        making it, `regenerate(prompts_before)` makes it again."""
        if self._ready is not None:
            ready, self._ready = self._ready, None
            return ready
        if self._future is None:
            return None
        future, self._future = self._future, None
        try:
            return future.result()
        except EngineDied:
            return regenerate(self._prompts_before)

    def state(self, join: bool, regenerate: Callable[[dict], Produced]) -> dict[str, Any]:
        """{"prompts": the stream before a rollout in flight (None: none in flight), "ready": a
        finished rollout not yet taken}; `join` waits for the one in flight first."""
        if join and self._future is not None:
            self._ready = self.take(regenerate)
        in_flight = self._future is not None
        return {"prompts": self._prompts_before if in_flight else None,
                "ready": None if self._ready is None else self._ready.to_dict()}

    def restore(self, ready: dict | None) -> None:
        """Drop any rollout in flight (its thread ends on its own; the result is ignored)."""
        self._future = None
        self._ready = None if ready is None else Produced.from_dict(ready)

    def close(self) -> None:
        self._future = None
        self._executor.shutdown(wait=False, cancel_futures=True)
