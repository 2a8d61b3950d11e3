"""GRPO end to end on a tiny checkpoint: metrics, precision alignment (fp32 engine == fp32 trainer
to round-off; a bf16 engine measured and corrected), the KL reference, exact resume in the middle
of a rollout, the CLI and config errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from posttrain.config import ConfigError
from posttrain.recipes.grpo import run_grpo
from tests.integration.grpo_configs import grpo_config, load

REPO = Path(__file__).resolve().parents[2]


def metrics(run_dir: str) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def step_rows(run_dir: str) -> list[dict]:
    return [m for m in metrics(run_dir) if "loss" in m]


@pytest.fixture(scope="module")
def model_dir(tiny_checkpoints) -> Path:
    return tiny_checkpoints["llama"]


def test_fp32_engine_and_trainer_agree_to_round_off(model_dir, task_dir, tmp_path, one_thread):
    cfg = load(grpo_config(model_dir, task_dir, tmp_path, steps=2, eval={
        "sources": [{"path": str(task_dir / "held_out.jsonl"), "fields": {"question": "user", "answer": "assistant"}}],
        "scorer": "addition", "max_new_tokens": 8, "at_start": True}))
    result = run_grpo(cfg)
    assert result.status == "finished" and result.steps == 2
    rows = step_rows(result.run_dir)
    first = rows[0]
    for key in ("reward/mean", "reward/addition/correct", "response/length_mean", "rollout/tokens_per_s",
                "time/generate_s", "time/reward_s", "time/sync_s", "clip/low_fraction", "entropy", "mfu"):
        assert key in first, key
    assert first["rollout/samples"] == 8 and first["rollout/groups"] == 2
    for row in rows:  # same weights, same dtype: only summation-order round-off separates them
        assert row["mismatch/max_abs_logprob_diff"] < 1e-5
        assert row["mismatch/kl_k3"] < 1e-10
        assert row["mismatch/ratio_outside_0.5_2"] == 0
    evals = [m for m in metrics(result.run_dir) if "eval/correct" in m]
    assert [m["step"] for m in evals] == [0, 2]
    assert (Path(result.export_dir) / "model.safetensors").exists()


@pytest.mark.parametrize("lm_head_fp32", [False, True])
def test_bf16_engine_mismatch_is_measured_and_corrected(model_dir, task_dir, tmp_path, one_thread, lm_head_fp32):
    cfg = load(grpo_config(model_dir, task_dir, tmp_path, steps=1,
                           rollout={"dtype": "bfloat16", "lm_head_fp32": lm_head_fp32},
                           grpo={"correction": {"mode": "tis", "cap": 1.01}}))
    row = step_rows(run_grpo(cfg).run_dir)[0]
    assert row["mismatch/abs_logprob_diff"] > 1e-4  # bf16 weights sample; fp32 recomputes
    assert row["mismatch/max_abs_logprob_diff"] >= row["mismatch/seq_max_abs_logprob_diff"] > 0
    assert 0 < row["correction/capped_fraction"] < 1
    assert row["correction/weight_mean"] < 1.01


def test_kl_to_the_lora_reference(model_dir, task_dir, tmp_path, one_thread):
    cfg = load(grpo_config(model_dir, task_dir, tmp_path, steps=3, lora={"enabled": True, "rank": 4},
                           train={"lr": 5e-2}, grpo={"beta": 0.5, "kl": "k3", "minibatches": 3},
                           rewards=[{"fn": "tests.unit.rl.reward_fixtures:parity"}]))
    rows = step_rows(run_grpo(cfg).run_dir)
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-12)  # the adapters start at zero
    assert rows[-1]["kl"] > 0  # the policy moved away from its reference (adapters off)
    assert [r["rollout/policy_lag"] for r in rows] == [0, 1, 2]


def run_for(model_dir, task_dir, root, steps: int, **sections):
    cfg = load(grpo_config(model_dir, task_dir, root, steps=steps, **sections))
    return run_grpo(cfg)


def test_resume_in_the_middle_of_a_rollout_is_exact(model_dir, task_dir, tmp_path, one_thread):
    sections = {"grpo": {"minibatches": 2}, "train": {"schedule": "constant", "lr": 1e-2},
                "rewards": [{"fn": "tests.unit.rl.reward_fixtures:parity"}],
                "checkpoint": {"resume": "auto", "every_steps": 1}}
    whole = run_for(model_dir, task_dir, tmp_path / "whole", 4, **sections)
    first = run_for(model_dir, task_dir, tmp_path / "split", 1, **sections)  # stops inside rollout 1
    second = run_for(model_dir, task_dir, tmp_path / "split", 4, **sections)
    assert first.steps == 1 and second.steps == 4
    assert second.losses == whole.losses[1:]
    a, b = load_file(Path(whole.export_dir) / "model.safetensors"), load_file(Path(second.export_dir) / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cli_runs_and_bad_configs_are_named(model_dir, task_dir, tmp_path):
    import yaml

    path = tmp_path / "grpo.yaml"
    path.write_text(yaml.safe_dump(grpo_config(model_dir, task_dir, tmp_path / "runs", steps=1)))
    done = subprocess.run([sys.executable, "-m", "posttrain", "grpo", str(path), "reward_workers.processes=1"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["status"] == "finished"
    with pytest.raises(ConfigError, match="data.task"):
        load(grpo_config(model_dir, task_dir, tmp_path, data={"task": "sft"}))
    with pytest.raises(ConfigError, match="rewards"):
        load(grpo_config(model_dir, task_dir, tmp_path, rewards=[{"fn": "addition"}, {"fn": "addition"}]))
    with pytest.raises(ConfigError, match="train.steps"):
        load(grpo_config(model_dir, task_dir, tmp_path, train={"steps": None}))
    with pytest.raises(ConfigError, match="rollout.placement.*launcher.backend: ray"):
        load(grpo_config(model_dir, task_dir, tmp_path, rollout={"placement": "separate"}))
    overlapped = load(grpo_config(model_dir, task_dir, tmp_path, rollout={"async": True}))
    assert overlapped.rollout.async_ and overlapped.model_dump(mode="json")["rollout"]["async"] is True
    with pytest.raises(ConfigError, match="rollout.asynch"):
        load(grpo_config(model_dir, task_dir, tmp_path, rollout={"asynch": True}))


def test_sigterm_during_a_rollout_saves_and_resumes(model_dir, task_dir, tmp_path, monkeypatch, one_thread):
    """A stop while the second rollout is scored ends the run in seconds with step 1 saved; the rerun
    makes that rollout again (same prompts, same weights) and ends like an uninterrupted run."""
    import time

    monkeypatch.delenv("POSTTRAIN_TEST_REWARD_CALLS", raising=False)
    sections = {"rewards": [{"fn": "tests.unit.rl.reward_fixtures:signal_on_second_call"}],
                "train": {"schedule": "constant", "lr": 1e-2}, "checkpoint": {"resume": "auto"}}
    started = time.perf_counter()
    stopped = run_for(model_dir, task_dir, tmp_path / "split", 3, **sections)
    assert stopped.status == "stopped" and stopped.steps == 1
    assert time.perf_counter() - started < 60
    assert (tmp_path / "split" / "run" / "checkpoints" / "step_1").is_dir()
    monkeypatch.setenv("POSTTRAIN_TEST_REWARD_CALLS", "5")  # no more signals
    resumed = run_for(model_dir, task_dir, tmp_path / "split", 3, **sections)
    monkeypatch.setenv("POSTTRAIN_TEST_REWARD_CALLS", "5")
    whole = run_for(model_dir, task_dir, tmp_path / "whole", 3, **sections)
    assert resumed.steps == 3 and resumed.losses == whole.losses[1:]


def test_a_killed_engine_process_is_restarted_and_the_run_finishes(model_dir, task_dir, tmp_path, monkeypatch,
                                                                   one_thread):
    monkeypatch.delenv("POSTTRAIN_TEST_ENGINE_KILLS", raising=False)
    result = run_for(model_dir, task_dir, tmp_path, 4, rollout={"process": True},
                     rewards=[{"fn": "tests.unit.rl.reward_fixtures:kill_engine_on_second_call"}])
    assert result.status == "finished" and result.steps == 4
    restarts = [r["rollout/engine_restarts"] for r in step_rows(result.run_dir)]
    assert restarts == [0, 1, 1, 1]  # killed while rollout 2 was scored; its next request (sleep) restarted it
