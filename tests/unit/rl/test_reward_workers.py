"""Reward workers: built-ins, user functions by module path, errors and hangs scored 0 and counted
per sample, `on_error: raise`, malformed results named."""

from __future__ import annotations

import pytest
import torch

from posttrain.rl.rewards.functions import length_penalty, math_reward, resolve_reward
from posttrain.rl.rewards.workers import RewardBatch, RewardError, RewardTerm, RewardWorkers

FIXTURES = "tests.unit.rl.reward_fixtures"


def batch(completions: list[str], references: list | None = None) -> RewardBatch:
    n = len(completions)
    return RewardBatch(["q"] * n, completions, references or ["1 + 1 = 2"] * n,
                       [{"num_tokens": 4, "finish_reason": "stop", "max_new_tokens": 8}] * n)


def test_builtins_weighted_and_logged():
    workers = RewardWorkers([RewardTerm("addition", "addition", 2.0),
                             RewardTerm("fmt", "format", 0.5, {"pattern": r"=\s*\d+$"})], processes=0)
    scores = workers.score(batch(["1 + 1 = 2", "1 + 1 = 3", "two"]))
    assert scores.total.tolist() == [2.5, 0.5, 0.0]
    assert scores.values["addition/correct"].tolist() == [1.0, 0.0, 0.0]
    assert scores.values["addition/format"].tolist() == [1.0, 1.0, 0.0]
    assert scores.errors == 0


def test_math_reward_uses_math_verify():
    rows = math_reward(["q"] * 4, ["The answer is 1000.", "#### 72", "$\\frac{1}{2}$", "no idea"],
                       ["#### 1,000", "Work... #### 72", "#### 0.5", "#### 3"], [{}] * 4)
    assert [r["correct"] for r in rows] == [1.0, 1.0, 1.0, 0.0]


def test_length_penalty_by_hand():
    meta = [{"num_tokens": n, "max_new_tokens": 20} for n in (5, 10, 15, 20)]
    assert length_penalty([], [], [], meta, target=10) == [0.0, 0.0, -0.5, -1.0]


def test_unknown_reward_is_named():
    with pytest.raises(ValueError, match="unknown reward 'bogus'"):
        resolve_reward("bogus")
    with pytest.raises(ValueError, match="has no function 'missing'"):
        resolve_reward(f"{FIXTURES}:missing")


def test_error_scores_only_the_failing_sample():
    workers = RewardWorkers([RewardTerm("f", f"{FIXTURES}:fails_on_seven")], processes=0)
    scores = workers.score(batch(["1", "7", "3"]))
    assert scores.total.tolist() == [1.0, 0.0, 1.0] and scores.errors == 1
    strict = RewardWorkers([RewardTerm("f", f"{FIXTURES}:fails_on_seven")], processes=0, on_error="raise")
    with pytest.raises(RewardError, match="reward 'f'.*cannot score a seven"):
        strict.score(batch(["7"]))


@pytest.mark.parametrize("fn, message", [("wrong_length", "returned 1; expected a list of 2"),
                                         ("not_finite", "non-finite")])
def test_malformed_results_are_named(fn, message):
    workers = RewardWorkers([RewardTerm("f", f"{FIXTURES}:{fn}")], processes=0, on_error="raise")
    with pytest.raises(RewardError, match=message):
        workers.score(batch(["1", "2"]))


def test_hang_times_out_and_the_pool_recovers():
    workers = RewardWorkers([RewardTerm("h", f"{FIXTURES}:hangs_on_seven")], processes=1, timeout_s=3.0)
    try:
        scores = workers.score(batch(["12", "7", "345"]))
        assert scores.total.tolist() == [1.0, 0.0, 1.0] and scores.errors == 1
        assert scores.values["h/seen"].tolist() == [2.0, 0.0, 3.0]
        again = workers.score(batch(["1"]))  # a fresh pool after the hung one was killed
        assert again.total.tolist() == [1.0] and again.errors == 0
    finally:
        workers.close()


def test_killed_worker_is_replaced():
    workers = RewardWorkers([RewardTerm("a", "addition")], processes=2, timeout_s=20.0)
    try:
        assert workers.score(batch(["1 + 1 = 2", "2"])).total.tolist() == [1.0, 0.0]
        for worker in workers._workers:
            worker.child.process.kill()
        scores = workers.score(batch(["1 + 1 = 2", "1 + 1 = 3"]))
        assert scores.total.tolist() == [1.0, 0.0]
    finally:
        workers.close()
    assert isinstance(scores.total, torch.Tensor)


class _FakeWorker:
    def __init__(self, fails: bool):
        self.fails, self.stopped, self.sent = fails, 0, []

    def send(self, request):
        if self.fails:
            raise RuntimeError("could not start")
        self.sent.append(request)

    def stop(self):
        self.stopped += 1


def test_a_failed_send_stops_the_workers_already_sent_to():
    """Their replies would otherwise be read as the next call's: they are started afresh instead."""
    workers = RewardWorkers([RewardTerm("a", "addition")], processes=0)
    first, second = _FakeWorker(fails=False), _FakeWorker(fails=True)
    workers._workers = [first, second]
    with pytest.raises(RuntimeError, match="could not start"):
        workers._call(workers.terms[0], batch(["1 + 1 = 2", "2"]))
    assert len(first.sent) == 1 and first.stopped == 1 and second.stopped == 0
