"""Reward scoring off the controller: worker processes, per-call timeouts, errors counted.

`RewardWorkers.score(batch)` calls every configured reward function on the whole batch, weights
and sums them. A call is split over `processes` spawned worker processes, each behind its own
pipe, or as many Ray actors under the Ray backend (`rewards/ray_worker.py`, the same protocol;
`processes: 0` runs it in the controller, without a timeout: only for trusted, quick
functions). When a batched call raises,
hangs past `timeout_s`, dies or returns something malformed, it is retried sample by sample, so
only the samples that fail get reward 0 and count in `reward/errors`; a hung or dead worker is
killed and replaced by a fresh process. With `on_error: raise` the first failure ends the run instead, naming the function.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from posttrain.cluster.child_process import ChildGone, PipedChild
from posttrain.rl.rewards.functions import normalise_result, resolve_reward

logger = logging.getLogger("posttrain.rl")


class RewardError(RuntimeError):
    """A reward function failed and the config says `on_error: raise`."""


@dataclass(frozen=True)
class RewardTerm:
    name: str
    fn: str
    weight: float = 1.0
    kwargs: dict = field(default_factory=dict)


@dataclass
class RewardBatch:
    prompts: list[str]
    completions: list[str]
    references: list[Any]
    metadata: list[dict]

    def __len__(self) -> int:
        return len(self.completions)

    def take(self, i: int) -> RewardBatch:
        return _subset(self, [i])


def _subset(batch: RewardBatch, idx: list[int]) -> RewardBatch:
    return RewardBatch([batch.prompts[i] for i in idx], [batch.completions[i] for i in idx],
                       [batch.references[i] for i in idx], [batch.metadata[i] for i in idx])


@dataclass
class RewardScores:
    total: torch.Tensor  # [N] float64: the weighted sum of the terms
    values: dict[str, torch.Tensor]  # "<term>" and "<term>/<key>" -> [N]
    errors: int  # samples x terms that failed and were scored 0
    seconds: float


START_TIMEOUT_S = 300


def call_reward(fn: str, kwargs: dict, batch: RewardBatch) -> list[dict[str, float]]:
    """Resolve and call one reward function on `batch` (in a worker process, or in-process)."""
    result = resolve_reward(fn)(batch.prompts, batch.completions, batch.references, batch.metadata, **kwargs)
    return normalise_result(fn, result, len(batch))


def answer(fn: str, kwargs: dict, batch: RewardBatch) -> tuple[str, Any]:
    """A worker's reply to one request: ("ok", rows) or ("error", "Type: message")."""
    try:
        return "ok", call_reward(fn, kwargs, batch)
    except Exception as err:  # noqa: BLE001 - user code: report, never die
        return "error", f"{type(err).__name__}: {err}"


def _serve(conn) -> None:
    """A worker process: answer `(fn, kwargs, batch)` requests until the pipe closes."""
    conn.send(("ready", None))
    while True:
        try:
            request = conn.recv()
        except EOFError:
            return
        conn.send(answer(*request))


class _Worker:
    """One reward process behind a private pipe; killed and replaced when a call times out or it dies."""

    def __init__(self):
        self.child = PipedChild(_serve, name="posttrain-reward", start_timeout_s=START_TIMEOUT_S)

    def stop(self) -> None:
        self.child.stop()

    def send(self, request: tuple) -> None:
        if not self.child.alive:
            self.child.start()
        self.child.send(request)

    def receive(self, deadline: float, what: str) -> list[dict[str, float]]:
        try:
            status, value = self.child.receive(deadline)
        except ChildGone:
            self.child.stop()
            raise RuntimeError(f"the worker running {what} died") from None
        except TimeoutError:
            self.child.stop()  # the hung call dies with its process; the next call starts a fresh one
            raise TimeoutError(f"{what} did not return in time") from None
        if status == "error":
            raise RuntimeError(value)
        return value


def _worker_class(backend: str) -> type:
    if backend == "ray":
        from posttrain.rl.rewards.ray_worker import RayWorker

        return RayWorker
    return _Worker


class RewardWorkers:
    def __init__(self, terms: list[RewardTerm], *, processes: int = 1, timeout_s: float = 60.0,
                 on_error: str = "zero", backend: str = "process"):
        """`backend`: "process" (spawned processes) or "ray" (Ray actors on this node)."""
        for term in terms:
            resolve_reward(term.fn)  # a bad name fails before the first rollout
        self.terms, self.processes, self.timeout_s, self.on_error = terms, processes, timeout_s, on_error
        self._workers = [_worker_class(backend)() for _ in range(processes)]

    def close(self) -> None:
        for worker in self._workers:
            worker.stop()

    def _call(self, term: RewardTerm, batch: RewardBatch) -> list[dict[str, float]]:
        """The term on `batch`, split over the workers (in-process without workers)."""
        if not self._workers:
            return call_reward(term.fn, term.kwargs, batch)
        size = -(-len(batch) // len(self._workers))
        parts = [(w, list(range(i * size, min(len(batch), (i + 1) * size)))) for i, w in enumerate(self._workers)]
        parts = [(w, idx) for w, idx in parts if idx]
        sent: list = []
        try:
            for worker, idx in parts:
                worker.send((term.fn, term.kwargs, _subset(batch, idx)))
                sent.append(worker)
        except Exception:
            for worker in sent:  # their replies would be read as the next call's: start them afresh
                worker.stop()
            raise
        deadline = time.monotonic() + self.timeout_s
        rows, failure = [], None
        for worker, _ in parts:  # collect every part (a failed one is restarted) before raising
            try:
                rows += worker.receive(deadline, f"reward {term.fn!r} (timeout {self.timeout_s:g} s)")
            except (RuntimeError, TimeoutError) as err:
                failure = failure or err
        if failure is not None:
            raise failure
        return rows

    def _term_rows(self, term: RewardTerm, batch: RewardBatch) -> tuple[list[dict[str, float]], int]:
        try:
            return self._call(term, batch), 0
        except Exception as err:  # noqa: BLE001 - any failure of user code is scored, not fatal
            if self.on_error == "raise":
                raise RewardError(f"reward {term.name!r} ({term.fn}) failed: {err}") from err
            first = err
        rows, errors = [], 0
        for i in range(len(batch)):
            try:
                rows.append(self._call(term, batch.take(i))[0])
            except Exception as err:  # noqa: BLE001
                logger.warning("reward %s failed on a sample (scored 0): %s", term.name, err)
                rows.append({"reward": 0.0})
                errors += 1
        if errors == 0:
            logger.warning("reward %s failed on the batch (%s) but on no single sample", term.name, first)
        return rows, errors

    def score(self, batch: RewardBatch) -> RewardScores:
        started = time.perf_counter()
        total = torch.zeros(len(batch), dtype=torch.float64)
        values: dict[str, torch.Tensor] = {}
        errors = 0
        for term in self.terms:
            rows, failed = self._term_rows(term, batch) if len(batch) else ([], 0)
            errors += failed
            reward = torch.tensor([r["reward"] for r in rows], dtype=torch.float64)
            total += term.weight * reward
            values[term.name] = reward
            keys = sorted({k for r in rows for k in r if k != "reward"})
            for key in keys:
                values[f"{term.name}/{key}"] = torch.tensor([r.get(key, 0.0) for r in rows], dtype=torch.float64)
        return RewardScores(total, values, errors, time.perf_counter() - started)
