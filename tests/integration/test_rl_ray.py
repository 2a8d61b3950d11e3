"""RL on the Ray backend: the engine and the reward workers as Ray actors. The engine actor gives the
native engine's samples, takes updates all or nothing and raises EngineDied once SIGKILLed; reward
actors time out and are replaced; a GRPO run whose engine actor is SIGKILLed mid-run finishes, and
an engine on CPUs of its own (`placement: separate`) trains like the in-process one."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from posttrain.cluster.launch import launch
from posttrain.models.hf import load_hf
from posttrain.recipes.grpo import run_grpo
from posttrain.rl.rewards.workers import RewardTerm, RewardWorkers
from posttrain.rollout import NativeEngine, SamplingParams
from posttrain.rollout.process_engine import EngineDied
from posttrain.rollout.ray_engine import RayEngine
from tests.integration.grpo_configs import grpo_config, load
from tests.integration.stops import wait_gone
from tests.unit.rl.test_reward_workers import FIXTURES, batch
from tests.unit.rollout.test_native_engine import PROMPTS, _perturbed, _snapshot
from tests.unit.rollout.test_process_engine import same

SAMPLED = SamplingParams(temperature=0.9, max_new_tokens=6)
ON_RAY = {"backend": "ray", "num_workers": 1, "cpus_per_worker": 1}


def test_engine_actor_samples_updates_and_death(ray_instance, tiny_checkpoints):
    model_dir = tiny_checkpoints["llama"]
    local = NativeEngine(load_hf(model_dir), AutoTokenizer.from_pretrained(model_dir))
    remote = RayEngine(model_dir)
    try:
        assert remote.pad_id == local.pad_id
        before = remote.generate(PROMPTS, SAMPLED, n=2, seed=1)
        assert same(before, local.generate(PROMPTS, SAMPLED, n=2, seed=1))
        original = _snapshot(load_hf(model_dir))
        remote.update_weights(_perturbed(original), version=5)
        assert remote.policy_version == 5
        changed = remote.generate(PROMPTS, SAMPLED, n=2, seed=1)
        assert not same(changed, before)
        with pytest.raises(ValueError, match="unknown tensor"):
            remote.update_weights(original[:3] + [("model.bogus.weight", torch.zeros(2))] + original[3:])
        assert same(remote.generate(PROMPTS, SAMPLED, n=2, seed=1), changed)  # refused whole, still up
        remote.update_weights(original, version=6)
        assert same(remote.generate(PROMPTS, SAMPLED, n=2, seed=1), before)
        os.kill(remote.pid, signal.SIGKILL)
        wait_gone(remote.pid)
        with pytest.raises(EngineDied):
            remote.generate(PROMPTS, SAMPLED, seed=1)
        remote.restart()
        assert remote.restarts == 1 and same(remote.generate(PROMPTS, SAMPLED, n=2, seed=1), before)
    finally:
        remote.close()


def test_reward_actors_time_out_and_are_replaced(ray_instance):
    workers = RewardWorkers([RewardTerm("h", f"{FIXTURES}:hangs_on_seven")], processes=2, timeout_s=3.0,
                            backend="ray")
    try:
        scores = workers.score(batch(["12", "7", "345"]))
        assert scores.total.tolist() == [1.0, 0.0, 1.0] and scores.errors == 1
        assert scores.values["h/seen"].tolist() == [2.0, 0.0, 3.0]
        pids = [w.pid for w in workers._workers if w.actor is not None]
        assert pids
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
            wait_gone(pid)
        again = workers.score(batch(["1", "22"]))  # dead actors are replaced, nothing is lost
        assert again.total.tolist() == [1.0, 1.0] and again.errors == 0
    finally:
        workers.close()


def _losses(run_dir: str) -> list[float]:
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_grpo_on_ray_survives_a_sigkilled_engine_actor(ray_instance, tiny_checkpoints, task_dir, tmp_path):
    cfg = load(grpo_config(tiny_checkpoints["llama"], task_dir, tmp_path, steps=4, rollout={"process": True},
                           rewards=[{"fn": f"{FIXTURES}:kill_ray_engine_on_second_call"}], launcher=ON_RAY))
    result = launch(run_grpo, cfg, cfg.launcher, env_vars={"POSTTRAIN_TEST_ENGINE_KILLS": "0"}).main
    assert result.status == "finished" and result.steps == 4
    rows = [json.loads(line) for line in (Path(result.run_dir) / "metrics.jsonl").read_text().splitlines()]
    restarts = [r["rollout/engine_restarts"] for r in rows if "loss" in r]
    assert restarts == [0, 1, 1, 1]  # killed while rollout 2 was scored; its next request restarted it


def test_separate_engine_trains_like_the_colocated_one(ray_instance, tiny_checkpoints, task_dir, tmp_path, one_thread):
    sections = {"rewards": [{"fn": f"{FIXTURES}:parity"}], "train": {"lr": 1e-2, "schedule": "constant"}}
    model_dir = tiny_checkpoints["llama"]
    here = run_grpo(load(grpo_config(model_dir, task_dir, tmp_path / "here", steps=3, **sections)))
    cfg = load(grpo_config(model_dir, task_dir, tmp_path / "ray", steps=3, launcher=ON_RAY,
                           rollout={"placement": "separate", "cpus": 1}, **sections))
    apart = launch(run_grpo, cfg, cfg.launcher).main
    assert apart.status == "finished"
    a, b = _losses(here.run_dir), _losses(apart.run_dir)
    scale = max(abs(x) for x in a)
    assert len(a) == len(b) == 3 and all(abs(x - y) <= 1e-5 * scale for x, y in zip(a, b)), (a, b)
