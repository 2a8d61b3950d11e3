"""`posttrain pipeline`: SFT -> GRPO -> DPO -> eval on a tiny checkpoint. SIGKILLed during its second
stage and run again, the first stage is not rerun, the second resumes from its checkpoint, and the
final export equals an uninterrupted pipeline's bit for bit (single-threaded). Config errors of
every stage are reported before anything runs; a changed stage is refused until `--rerun`, which
also reruns the stages made from it. `posttrain eval` writes samples and a summary."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from posttrain.config import ConfigError
from posttrain.pipeline.runner import load_pipeline
from tests.integration.dpo_configs import dpo_config, write_pairs
from tests.integration.grpo_configs import grpo_config
from tests.integration.sft_configs import recipe_config

REPO = Path(__file__).resolve().parents[2]
PARITY = [{"fn": "tests.unit.rl.reward_fixtures:parity"}]
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def pipeline_file(tmp_path: Path, model_dir: Path, task_dir: Path, root: Path) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    held_out = {"path": str(task_dir / "held_out.jsonl"), "fields": {"question": "user", "answer": "assistant"}}
    source = {"path": str(task_dir / "train.jsonl"), "fields": {"question": "user", "answer": "assistant"}}
    sft = recipe_config(model_dir, "unused", data={"sources": [source]}, train={"steps": 3, "warmup_steps": 1})
    grpo = grpo_config("${stages.sft.export}", task_dir, "unused", steps=3, rewards=PARITY,
                       train={"schedule": "constant", "lr": 1e-2}, checkpoint={"every_steps": 1})
    dpo = dpo_config("${stages.grpo.export}", write_pairs(tmp_path / "pairs.jsonl", 16), "unused", steps=2)
    for cfg in (sft, grpo, dpo):
        del cfg["output_dir"], cfg["name"]  # the pipeline places every stage
    (tmp_path / "grpo.yaml").write_text(yaml.safe_dump(grpo))
    evaluate = {"model": {"path": "${stages.dpo.export}"}, "sources": [held_out], "scorer": "addition",
                "max_samples": 4, "max_new_tokens": 8}
    pipeline = {"name": "pipe", "output_dir": str(root), "stages": [
        {"name": "sft", "recipe": "sft", "config": sft},
        {"name": "grpo", "recipe": "grpo", "config": "grpo.yaml"},  # a file, relative to the pipeline file
        {"name": "dpo", "recipe": "dpo", "config": dpo},
        {"name": "eval", "recipe": "eval", "config": evaluate}]}
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(pipeline))
    return path


def run_cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "posttrain", *args], cwd=REPO, env=ONE_THREAD,
                          capture_output=True, text=True, timeout=timeout)


def state(root: Path) -> dict:
    return json.loads((root / "pipe" / "pipeline.json").read_text())["stages"]


def test_killed_pipeline_resumes_its_second_stage_and_ends_like_an_uninterrupted_one(
        tiny_checkpoints, task_dir, tmp_path):
    model_dir = tiny_checkpoints["llama"]
    whole_root, split_root = tmp_path / "whole", tmp_path / "split"
    whole = run_cli("pipeline", str(pipeline_file(tmp_path / "a", model_dir, task_dir, whole_root)))
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert json.loads(whole.stdout.strip().splitlines()[-1])["status"] == "finished"

    config = pipeline_file(tmp_path / "b", model_dir, task_dir, split_root)
    process = subprocess.Popen([sys.executable, "-m", "posttrain", "pipeline", str(config)], cwd=REPO,
                               env=ONE_THREAD, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = split_root / "pipe" / "grpo" / "checkpoints" / "step_1" / "meta.json"
    deadline = time.monotonic() + 300
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed = state(split_root)
    assert killed["sft"]["status"] == "finished" and killed["grpo"]["status"] == "running"

    plan = run_cli("pipeline", str(config), "--plan")
    assert plan.returncode == 0 and "skip (finished)" in plan.stderr and "resume (running" in plan.stderr
    again = run_cli("pipeline", str(config))
    assert again.returncode == 0, again.stderr[-3000:]
    after = state(split_root)
    assert after["sft"]["started"] == killed["sft"]["started"]  # not rerun
    assert all(after[s]["status"] == "finished" for s in ("sft", "grpo", "dpo", "eval"))
    assert "resuming from step_" in again.stderr  # the second stage resumed from its checkpoint
    a = load_file(whole_root / "pipe" / "dpo" / "export" / "model.safetensors")
    b = load_file(split_root / "pipe" / "dpo" / "export" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert after["eval"]["summary"]["samples"] == 4
    assert after["eval"]["summary"]["score/correct"] == state(whole_root)["eval"]["summary"]["score/correct"]

    # A changed stage is refused, naming it; --rerun reruns it and the stages made from it.
    with pytest.raises(ConfigError, match="stage 'sft': its config changed.*--rerun sft"):
        load_pipeline(config, ["stages.0.config.train.lr=0.5"], [])
    decisions, _ = load_pipeline(config, ["stages.0.config.train.lr=0.5"], ["sft"])
    assert [d.action for d in decisions] == ["rerun", "rerun", "rerun", "rerun"]
    decisions, _ = load_pipeline(config, [], [])
    assert [d.action for d in decisions] == ["skip"] * 4
    (split_root / "pipe" / "grpo" / "export" / "SHA256SUMS").unlink()  # an export no longer complete
    with pytest.raises(ConfigError, match="stage 'grpo': it finished, but its output .*export is missing"):
        load_pipeline(config, [], [])


def test_every_stage_error_is_reported_before_anything_runs(tiny_checkpoints, task_dir, tmp_path):
    config = pipeline_file(tmp_path, tiny_checkpoints["llama"], task_dir, tmp_path / "runs")
    cases = {
        "stages.2.config.model.path=${stages.nope.export}": "there is no stage named 'nope'",
        'stages.1.overrides=["model.path=${stages.dpo.export}"]': "'dpo' comes later: a cycle",
        "stages.2.config.model.path=${stages.eval.export}": "'eval' comes later",
    }
    for override, message in cases.items():
        with pytest.raises(ConfigError, match=message):
            load_pipeline(config, [override], [])
    with pytest.raises(ConfigError) as err:
        load_pipeline(config, ["stages.0.config.train.lr=-1", "stages.3.config.scorer=bad scorer"], [])
    assert "stage 'sft'" in str(err.value) and "stage 'eval'" in str(err.value)
    with pytest.raises(ConfigError, match="--rerun nope: no such stage"):
        load_pipeline(config, [], ["nope"])
    assert not (tmp_path / "runs").exists()
    (tmp_path / "runs" / "pipe" / "grpo").mkdir(parents=True)  # a folder pipeline.json knows nothing of
    with pytest.raises(ConfigError, match="stage 'grpo': its folder .* exists but pipeline.json has no record"):
        load_pipeline(config, [], [])


def test_eval_command_writes_samples_and_a_summary(tiny_checkpoints, task_dir, tmp_path):
    done = run_cli("eval", "--model", str(tiny_checkpoints["llama"]), "--data", str(task_dir / "held_out.jsonl"),
                   "--fields", "question=user,answer=assistant", "--scorer", "addition",
                   "--max-new-tokens", "6", "--output", str(tmp_path / "ev"), "max_samples=3")
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert summary["samples"] == 3 and 0 <= summary["score/correct"] <= 1
    assert summary["response_tokens_max"] <= 6 and "truncated_share" in summary
    samples = [json.loads(x) for x in (tmp_path / "ev" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 3 and {"prompt", "response", "reference", "correct"} <= samples[0].keys()
    assert json.loads(done.stdout.strip().splitlines()[-1])["samples"] == 3
