"""Distillation end to end on tiny models: a 4-layer teacher, a 2-layer student made from its layers.

Live teacher and a top-k table of the whole vocabulary give the same run; the table's pass
resumes where it stopped; training resumes exactly; LoRA students train and export; tokenizers
that differ are refused before any weight loads; the CLI runs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import posttrain.train.frozen_pass as frozen_pass
import posttrain.train.teacher_cache as teacher_cache
import posttrain.train.trainer as trainer
from posttrain.config.distill import DistillConfig
from posttrain.config.loading import validate_config
from posttrain.models.hf import load_hf
from posttrain.recipes.distill import STUDENT_DIR, run_distill
from tests.integration.stops import sigterm_after_checkpoint
from tests.integration.dpo_configs import REPO, logged, per_step
from tests.integration.sft_configs import merge_sections, recipe_config

pytestmark = pytest.mark.usefixtures("one_thread")


def distill_config(teacher_path: Path, task_dir: Path, run_root: Path, *, steps: int = 4, **sections) -> dict:
    source = {"path": str(task_dir / "train.jsonl"), "fields": {"question": "user", "answer": "assistant"}}
    held_out = {"path": str(task_dir / "held_out.jsonl"), "fields": {"question": "user", "answer": "assistant"}}
    cfg = recipe_config(teacher_path, run_root, data={"sources": [source]},
                        train={"steps": steps, "warmup_steps": 1, "grad_accum": 2},
                        model={"init_from": {"layers": [0, 2]}}, teacher={"path": str(teacher_path)},
                        eval={"sources": [held_out], "every_steps": 2})
    del cfg["model"]["path"]
    return merge_sections(cfg, sections)


def run(teacher_path, task_dir, run_root, **sections):
    return run_distill(validate_config(distill_config(teacher_path, task_dir, run_root, **sections), DistillConfig))


def assert_steps_close(a: dict, b: dict, rtol: float) -> None:
    assert a.keys() == b.keys() and a
    for step in a:
        for key in ("loss", "distill/divergence", "distill/ce", "distill/teacher_ce", "distill/agreement"):
            assert abs(a[step][key] - b[step][key]) <= rtol * max(1.0, abs(a[step][key])), (step, key)


def test_live_distillation_trains_a_student_made_from_the_teacher(teacher_dir, task_dir, tmp_path):
    result = run(teacher_dir, task_dir, tmp_path, steps=8, distill={"loss": "forward_kl", "temperature": 2.0})
    assert result.status == "finished" and result.steps == 8
    student = load_hf(Path(result.run_dir) / STUDENT_DIR)
    assert student.args.num_layers == 2
    steps = per_step(result.run_dir)
    assert steps[8]["distill/divergence"] < 0.7 * steps[1]["distill/divergence"]
    assert 0.0 <= steps[8]["distill/agreement"] <= 1.0 and steps[8]["distill/teacher_ce"] > 0
    evals = [r for r in logged(result.run_dir) if "eval/distill/divergence" in r]
    assert len(evals) >= 2 and evals[-1]["eval/distill/divergence"] < evals[0]["eval/distill/divergence"]
    exported = load_hf(result.export_dir)
    assert exported.args.num_layers == 2
    saved = yaml.safe_load((Path(result.run_dir) / "config.yaml").read_text())
    assert saved["model"]["path"] == str(Path(result.run_dir) / STUDENT_DIR)


@pytest.mark.parametrize("loss", ["reverse_kl", "jsd"])
def test_a_topk_table_of_the_whole_vocabulary_is_the_live_teacher(teacher_dir, task_dir, tmp_path, loss):
    vocab = load_hf(teacher_dir).vocab_size
    distill = {"loss": loss, "temperature": 1.5, "kd_weight": 0.8}
    live = run(teacher_dir, task_dir, tmp_path / "live", distill=distill)
    table = run(teacher_dir, task_dir, tmp_path / "topk", distill={**distill, "teacher_signal": "topk", "topk": vocab})
    assert_steps_close(per_step(live.run_dir), per_step(table.run_dir), rtol=1e-4)
    (cache,) = (Path(table.run_dir) / teacher_cache.CACHE_DIR).iterdir()
    record = json.loads((cache / frozen_pass.COMPLETE_FILE).read_text())
    assert record["documents_scored"] > 0 and json.loads((cache / "inputs.json").read_text())["topk"]["k"] == vocab


class Killed(Exception):
    pass


def test_an_interrupted_topk_pass_resumes_where_it_stopped(teacher_dir, task_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(frozen_pass, "PART_BATCHES", 1)
    real, calls, killed = teacher_cache.linear_topk, [], []

    def interrupting(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3 and not killed:
            killed.append(1)
            raise Killed("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(teacher_cache, "linear_topk", interrupting)
    sections = {"steps": 1, "distill": {"teacher_signal": "topk", "topk": 5}}
    with pytest.raises(Killed):
        run(teacher_dir, task_dir, tmp_path / "a", **sections)
    (directory,) = (tmp_path / "a" / "run" / teacher_cache.CACHE_DIR).iterdir()
    assert sorted(p.name for p in directory.glob("*.safetensors")) == [
        "s0-r00000-p000000.safetensors", "s0-r00000-p000001.safetensors"]
    calls.clear()
    resumed = run(teacher_dir, task_dir, tmp_path / "a", **sections)
    resumed_calls = len(calls)
    calls.clear()
    whole = run(teacher_dir, task_dir, tmp_path / "b", **sections)
    assert resumed.status == whole.status == "finished"
    assert resumed_calls == len(calls) - 2  # the two stored parts were not computed again
    ours = teacher_cache.TopKTable.load(directory)
    (other,) = (tmp_path / "b" / "run" / teacher_cache.CACHE_DIR).iterdir()
    theirs = teacher_cache.TopKTable.load(other)
    assert ours.index == theirs.index
    for name in ours.rows:
        torch.testing.assert_close(ours.rows[name], theirs.rows[name], rtol=0, atol=0)


def test_resume_is_exact(teacher_dir, task_dir, tmp_path, monkeypatch):
    sections = {"steps": 4, "checkpoint": {"every_steps": 2, "resume": "auto"}, "distill": {"loss": "jsd"}}
    straight = run(teacher_dir, task_dir, tmp_path / "a", **sections)
    real_checkpoint = trainer._checkpoint
    sigterm_after_checkpoint(monkeypatch, 2)
    stopped = run(teacher_dir, task_dir, tmp_path / "b", **sections)
    assert stopped.status == "stopped" and stopped.steps == 2
    monkeypatch.setattr(trainer, "_checkpoint", real_checkpoint)
    resumed = run(teacher_dir, task_dir, tmp_path / "b", **sections)
    assert resumed.status == "finished" and resumed.steps == 4
    a, b = per_step(straight.run_dir), per_step(resumed.run_dir)
    assert a == b


def test_a_lora_student_trains_and_exports_merged_weights(teacher_dir, task_dir, tmp_path):
    result = run(teacher_dir, task_dir, tmp_path, steps=3, lora={"enabled": True, "rank": 4, "alpha": 8},
                 train={"lr": 5e-3})
    assert result.status == "finished"
    steps = per_step(result.run_dir)
    assert steps[3]["distill/divergence"] < steps[1]["distill/divergence"]
    exported, start = load_hf(result.export_dir), load_hf(Path(result.run_dir) / STUDENT_DIR)
    moved = [n for n, p in exported.named_parameters() if not torch.equal(p, dict(start.named_parameters())[n])]
    assert moved and all("layers." in n for n in moved)  # the adapters were merged into the layers


def test_a_teacher_with_another_tokenizer_is_refused_before_weights_load(teacher_dir, task_dir, tmp_path,
                                                                         tiny_checkpoints, monkeypatch):
    other = tmp_path / "other"
    other.mkdir()
    for f in Path(tiny_checkpoints["llama"]).iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    vocab = json.loads((other / "tokenizer.json").read_text())
    tokens = vocab["model"]["vocab"]
    first = next(iter(tokens))
    tokens[first + "x"] = tokens.pop(first)
    (other / "tokenizer.json").write_text(json.dumps(vocab))
    monkeypatch.setattr(trainer, "build_trainable", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    cfg = distill_config(teacher_dir, task_dir, tmp_path)
    cfg["model"] = {"path": str(tiny_checkpoints["llama"])}
    cfg["teacher"] = {"path": str(other)}
    with pytest.raises(ValueError, match="tokenizers differ: .* has '.*' as id 0, .* lacks it"):
        run_distill(validate_config(cfg, DistillConfig))


@pytest.mark.parametrize("change, message", [
    ({"model": {"path": "X", "init_from": {"layers": [0]}}}, "exactly one"),
    ({"data": {"task": "preference"}}, "data.task"),
    ({"distill": {"beta": 1.0}}, "beta"),
    ({"distill": {"teacher_signal": "logits"}}, "teacher_signal"),
])
def test_bad_configs_are_named(teacher_dir, task_dir, tmp_path, change, message):
    from posttrain.config import ConfigError

    cfg = distill_config(teacher_dir, task_dir, tmp_path)
    for section, values in change.items():
        cfg[section] = {**cfg.get(section, {}), **values}
    if "path" in change.get("model", {}):
        cfg["model"]["path"] = str(teacher_dir)
    with pytest.raises((ConfigError, ValueError), match=message):
        validate_config(cfg, DistillConfig)


def test_cli_runs_a_distillation(teacher_dir, task_dir, tmp_path):
    config = tmp_path / "distill.yaml"
    config.write_text(yaml.safe_dump(distill_config(teacher_dir, task_dir, tmp_path / "runs", steps=2)))
    done = subprocess.run([sys.executable, "-m", "posttrain", "distill", str(config), "distill.loss=reverse_kl"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["status"] == "finished" and summary["steps"] == 2 and Path(summary["export"]).is_dir()
