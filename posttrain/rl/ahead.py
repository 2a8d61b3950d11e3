"""`rollout.async`: the next rollout generates in a background thread while the trainer updates.

    step k:   take rollout k (made with the weights before update k-1) -> push weights v_k ->
              start rollout k+1 in the background with v_k -> train on rollout k

The background thread only draws prompts, talks to the engine and the reward workers and
computes group advantages: nothing collective (weights are gathered and pushed on the trainer's
thread before it starts; agreeing across ranks, the teacher's and the old log-probs run when the
rollout is taken). A checkpoint waits for the rollout in flight and stores it (`Produced`), so a
resumed run trains on exactly what an uninterrupted one would. Rewinding a step in this process
(a stop signal while the step is made) keeps the rollout that was in flight at the rewind point
(or gives back the one the step took) and drops one started since, undoing its draws.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

from posttrain.data.batch import Sample, samples_from_dicts, samples_to_dicts
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
        return {"groups": samples_to_dicts(self.groups), "dropped": samples_to_dicts(self.dropped),
                "stats": asdict(self.stats), "version": self.version}

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> Produced:
        return cls(samples_from_dicts(state["groups"]), samples_from_dicts(state["dropped"]),
                   RolloutStats(**state["stats"]), int(state["version"]))


class RolloutAhead:
    def __init__(self, generate: Callable[[RolloutStats, int], Produced]):
        """`generate(stats, version)` makes a rollout with the engine's current weights."""
        self._generate = generate
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="posttrain-rollout-ahead")
        self._future: Future | None = None
        self._token = 0  # numbers the rollouts started, so a rewind knows whether one is its own
        self._prompts_before: dict | None = None  # the prompt stream before the rollout in flight drew
        self._ready: Produced | None = None  # waited for by a checkpoint, or restored from one
        self._held: Produced | None = None  # taken by the step being made, not handed out yet
        self._thread = threading.local()

    def in_background(self) -> bool:
        return getattr(self._thread, "ahead", False)

    def _run(self, stats: RolloutStats, version: int) -> Produced:
        self._thread.ahead = True
        return self._generate(stats, version)

    def start(self, stats: RolloutStats, version: int, prompts_before: dict) -> None:
        self._prompts_before = prompts_before
        self._token += 1
        self._future = self._executor.submit(self._run, stats, version)

    def _join(self, regenerate: Callable[[dict], Produced]) -> Produced:
        """The rollout in flight, once done (the future stays referenced until then, so a stop
        signal while waiting leaves it in flight)."""
        try:
            produced = self._future.result()
        except EngineDied:
            self._future = None
            return regenerate(self._prompts_before)
        self._future = None
        return produced

    def take(self, regenerate: Callable[[dict], Produced]) -> Produced | None:
        """The rollout made ahead (None before the first one started); held until `release()`. If
        the engine died while making it, `regenerate(prompts_before)` makes it again."""
        if self._ready is None and self._future is None:
            return None
        produced = self._ready if self._ready is not None else self._join(regenerate)
        self._ready, self._held = None, produced
        return produced

    def hold(self, produced: Produced) -> None:
        """A rollout made on the trainer's thread, held like a taken one."""
        self._held = produced

    def release(self) -> None:
        """The step that took the held rollout was handed out."""
        self._held = None

    def state(self, join: bool, regenerate: Callable[[dict], Produced]) -> dict[str, Any]:
        """{"prompts": the stream before a rollout in flight (None: none in flight), "ready": a
        finished rollout not yet taken, "token": the one in flight}; `join` waits for it first."""
        if join and self._future is not None:
            self._ready = self._join(regenerate)
        in_flight = self._future is not None
        return {"prompts": self._prompts_before if in_flight else None,
                "ready": None if self._ready is None else self._ready.to_dict(),
                "token": self._token if in_flight else None, "owner": id(self)}

    def restore(self, ready: dict | None) -> None:
        """State from a checkpoint (a fresh controller: nothing in flight)."""
        self._drop()
        self._ready = None if ready is None else Produced.from_dict(ready)

    def rewind(self, token: int | None) -> tuple[bool, dict | None]:
        """Back to a `position()` of this process: the rollout that was in flight then stays in
        flight (or, taken since, becomes ready again); one started since is dropped, after its
        thread ends. Returns (whether the position's prompt stream is still the one to restore,
        else the stream to restore instead, or None to leave it as it is)."""
        own_in_flight = self._future is not None and token == self._token
        dropped = None
        if self._future is not None and not own_in_flight:
            dropped = self._prompts_before
            self._drop()
        if self._held is not None:
            self._ready, self._held = self._held, None
        kept = own_in_flight or self._ready is not None
        return (not kept and dropped is None), dropped

    def _drop(self) -> None:
        """Wait for a rollout in flight to end and forget it (its draws are undone by the caller)."""
        if self._future is not None:
            self._future.cancel()
            try:
                self._future.result()
            except BaseException:  # noqa: BLE001 - a dropped rollout's failure does not matter
                pass
        self._future = None

    def close(self) -> None:
        """Wait for a rollout in flight to end (close the engine first, so it ends soon)."""
        self._drop()
        self._executor.shutdown(wait=True)
