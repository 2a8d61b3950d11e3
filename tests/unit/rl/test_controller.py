"""The controller's rollout pieces on a scripted engine: rollout samples and their fields, dynamic
sampling, overlong filtering and penalty, minibatch split, the old-log-prob pass and its state."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from posttrain.data.batch import IGNORE_INDEX
from posttrain.models.sampling import SamplingParams
from posttrain.parallel.mesh import DataParallel
from posttrain.rl.controller import RolloutController, RolloutPlan, overlong_penalty, split
from posttrain.rl.prompts import Prompt
from posttrain.rl.rewards.workers import RewardTerm, RewardWorkers
from posttrain.rl.rollout_metrics import RolloutStats
from posttrain.rl.samples import rollout_sample
from posttrain.rollout.engine import RolloutBatch


class ScriptedEngine:
    """Sample s of every prompt is `s + 1` tokens `[10, 11, ...]`, log-prob -0.5 each; finish
    "length" when it reaches max_new_tokens."""

    policy_version = 0

    def generate(self, prompt_ids, sampling, n=1, seed=0, prompt_index=None):
        tokens, finish = [], []
        for _ in prompt_ids:
            for s in range(n):
                length = min(s + 1, sampling.max_new_tokens)
                tokens.append(list(range(10, 10 + length)))
                finish.append("length" if length == sampling.max_new_tokens else "stop")
        out = SimpleNamespace(token_ids=tokens, logprobs=[[-0.5] * len(t) for t in tokens],
                              raw_logprobs=[[-0.4] * len(t) for t in tokens], finish_reasons=finish,
                              prompt_index=[p for p in (prompt_index or range(len(prompt_ids))) for _ in range(n)],
                              sample_index=[s for _ in prompt_ids for s in range(n)],
                              prompt_ids=[p for p in prompt_ids for _ in range(n)],
                              texts=["x" * len(t) for t in tokens])
        return RolloutBatch.from_generation(out, pad_id=0, policy_version=0)

    def sleep(self, level=1):
        pass

    def wake(self):
        pass


def controller(**plan) -> RolloutController:
    settings = dict(prompts_per_step=2, n=3, sampling=SamplingParams(max_new_tokens=3), seed=0, advantage="grpo")
    settings.update(plan)
    rewards = RewardWorkers([RewardTerm("p", "tests.unit.rl.reward_fixtures:parity")], processes=0)
    return RolloutController(RolloutPlan(**settings), prompts=None, engine=ScriptedEngine(), rewards=rewards,
                             policy=None, dp=DataParallel(0, 1), device=torch.device("cpu"), pad_id=0)


PROMPTS = [Prompt(0, [1, 2, 3], "different", None), Prompt(1, [4, 5], "same", None)]


def test_rollout_sample_fields_sit_on_the_label_positions():
    s = rollout_sample([1, 2, 3], [7, 8], [-0.1, -0.2], advantage=0.5, group=9)
    assert s.input_ids == [1, 2, 3, 7, 8]
    assert s.labels == [IGNORE_INDEX, IGNORE_INDEX, 7, 8, IGNORE_INDEX]
    assert s.fields["rollout_logprobs"] == [0.0, 0.0, -0.1, -0.2, 0.0]
    assert s.fields["advantages"] == [0.0, 0.0, 0.5, 0.5, 0.0]
    assert s.group == 9


def test_groups_advantages_and_dynamic_sampling():
    ctrl = controller(dynamic_sampling=True, max_rounds=2)
    stats = RolloutStats()
    kept, dropped = ctrl._groups_of(PROMPTS, stats, 0)
    # prompt "same": constant reward 1.0 -> dropped; "different": lengths 1, 2, 3 -> parity 1, 0, 1
    assert len(kept) == 1 and len(dropped) == 1 and stats.dropped_groups == 1
    adv = [s.fields["advantages"][-2] for s in kept[0]]
    std = math.sqrt(1.0 / 3.0)  # rewards 1, 0, 1: mean 2/3, unbiased std sqrt(1/3)
    expected = [(r - 2 / 3) / (std + 1e-4) for r in (1.0, 0.0, 1.0)]
    assert all(math.isclose(a, e, rel_tol=1e-6) for a, e in zip(adv, expected))
    no_dynamic, _ = controller()._groups_of(PROMPTS, RolloutStats(), 0)
    assert len(no_dynamic) == 2


def test_overlong_filter_and_penalty():
    kept, _ = controller(overlong="filter")._groups_of(PROMPTS, stats := RolloutStats(), 0)
    assert [len(g) for g in kept] == [2, 2] and stats.filtered_samples == 2  # the 3-token samples
    batch = ScriptedEngine().generate([[1]], SamplingParams(max_new_tokens=3), n=3)
    plan = RolloutPlan(prompts_per_step=1, n=3, sampling=SamplingParams(max_new_tokens=3), seed=0,
                       advantage="grpo", overlong="penalty", overlong_buffer=2, overlong_penalty=1.0)
    # lengths 1, 2, 3; the penalty starts after 3 - 2 = 1 token: 0, -0.5, -1
    assert overlong_penalty(batch, plan).tolist() == [0.0, -0.5, -1.0]


def test_split_keeps_groups_whole():
    groups = [[f"g{i}a", f"g{i}b"] for i in range(5)]
    parts = split(groups, 2)
    assert parts == [["g0a", "g0b", "g1a", "g1b"], ["g2a", "g2b", "g3a", "g3b", "g4a", "g4b"]]


def test_a_dead_engine_on_one_of_several_ranks_fails_the_step():
    """Re-syncing a fresh engine gathers sharded weights collectively: one rank cannot do it alone."""
    from posttrain.rollout.process_engine import EngineDied

    ctrl = RolloutController(RolloutPlan(prompts_per_step=2, n=2, sampling=SamplingParams(max_new_tokens=3), seed=0,
                                         advantage="grpo"),
                             prompts=None, engine=ScriptedEngine(), rewards=None, policy=None,
                             dp=DataParallel(0, 2), device=torch.device("cpu"), pad_id=0)

    def died():
        raise EngineDied("gone")

    with pytest.raises(RuntimeError, match="several data-parallel ranks") as err:
        ctrl._engine(RolloutStats(), died)
    assert not isinstance(err.value, EngineDied)
