"""`rollout.async`: the next rollout generates while the trainer updates. Steps after the first
train on samples one policy version old (logged, and visible in the mismatch metrics), a resumed
run trains on exactly what an uninterrupted one does, and an engine that dies while generating
ahead is restarted and the rollout made again; a stop while the trainer waits for the rollout
ahead keeps it, so the resumed run is exact too."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.integration.test_grpo import run_for, step_rows

PARITY = [{"fn": "tests.unit.rl.reward_fixtures:parity"}]
ASYNC = {"rollout": {"async": True}, "train": {"schedule": "constant", "lr": 1e-2}, "rewards": PARITY}


def test_steps_train_on_rollouts_one_version_old(model_dir, task_dir, tmp_path, one_thread):
    result = run_for(model_dir, task_dir, tmp_path, 4, grpo={"correction": {"mode": "tis", "cap": 1.5}}, **ASYNC)
    assert result.status == "finished" and result.steps == 4
    rows = step_rows(result.run_dir)
    assert [r["rollout/policy_lag"] for r in rows] == [0, 1, 1, 1]
    assert [r["rollout/policy_version"] for r in rows] == [0, 0, 1, 2]
    assert rows[0]["mismatch/max_abs_logprob_diff"] < 1e-5  # the first rollout is on-policy
    assert all(r["mismatch/max_abs_logprob_diff"] > 1e-4 for r in rows[1:])  # then one update stale
    assert all("correction/weight_mean" in r for r in rows)


def test_resume_with_a_rollout_in_flight_is_exact(model_dir, task_dir, tmp_path, one_thread):
    sections = {**ASYNC, "checkpoint": {"resume": "auto", "every_steps": 2}}
    whole = run_for(model_dir, task_dir, tmp_path / "whole", 4, **sections)
    first = run_for(model_dir, task_dir, tmp_path / "split", 2, **sections)
    second = run_for(model_dir, task_dir, tmp_path / "split", 4, **sections)
    assert first.steps == 2 and second.steps == 4
    assert first.losses + second.losses == whole.losses
    lags = [r["rollout/policy_lag"] for r in step_rows(second.run_dir)]
    assert lags[-2:] == [1, 1]  # the resumed steps still train on the rollout generated ahead
    a = load_file(Path(whole.export_dir) / "model.safetensors")
    b = load_file(Path(second.export_dir) / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_stop_while_waiting_for_the_rollout_ahead_resumes_exactly(model_dir, task_dir, tmp_path, monkeypatch,
                                                                    one_thread):
    sections = {**ASYNC, "rewards": [{"fn": "tests.unit.rl.reward_fixtures:signal_and_go_on_second_call"}],
                "checkpoint": {"resume": "auto"}}
    monkeypatch.setenv("POSTTRAIN_TEST_REWARD_CALLS", "0")
    stopped = run_for(model_dir, task_dir, tmp_path / "split", 4, **sections)
    assert stopped.status == "stopped" and stopped.steps == 1  # stopped in step 2's wait for its rollout
    monkeypatch.setenv("POSTTRAIN_TEST_REWARD_CALLS", "5")  # no more signals
    resumed = run_for(model_dir, task_dir, tmp_path / "split", 4, **sections)
    monkeypatch.setenv("POSTTRAIN_TEST_REWARD_CALLS", "5")
    whole = run_for(model_dir, task_dir, tmp_path / "whole", 4, **sections)
    assert resumed.steps == 4 and resumed.losses == whole.losses[1:]


def test_engine_dying_while_generating_ahead(model_dir, task_dir, tmp_path, monkeypatch, one_thread):
    monkeypatch.delenv("POSTTRAIN_TEST_ENGINE_KILLS", raising=False)
    kill = [{"fn": "tests.unit.rl.reward_fixtures:kill_engine_on_second_call", "kwargs": {"constant": True, "on_call": 3}}]
    result = run_for(model_dir, task_dir, tmp_path, 3, rollout={"async": True, "process": True}, rewards=kill,
                     grpo={"dynamic_sampling": {"enabled": True, "max_rounds": 2}})
    assert result.status == "finished" and result.steps == 3
    rows = step_rows(result.run_dir)
    # rollout 1 scores twice (a refill round); the third call, in the rollout made ahead, kills the
    # engine, whose refill round then finds it dead: taken, that rollout is made again
    assert [r["rollout/engine_restarts"] for r in rows] == [0, 1, 1]
    assert [r["rollout/policy_lag"] for r in rows] == [0, 0, 1]  # made again with the current weights
