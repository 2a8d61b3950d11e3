"""On-policy distillation (`advantage: teacher_reverse_kl`) on tiny checkpoints: the policy's
reverse KL to a different teacher falls, on its rollouts and on held-out prompts; a teacher with
another tokenizer is refused naming the token, before its weights load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from posttrain.recipes.grpo import run_grpo
from posttrain.train.roles import check_shared_tokenizer
from tests.integration.grpo_configs import grpo_config, load
from tests.tiny_models import build_byte_tokenizer, build_tiny_checkpoint


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    return build_tiny_checkpoint("llama", tmp_path_factory.mktemp("teacher"), seed=7)


def distill_config(model_dir, teacher_dir, task_dir, root, steps: int) -> dict:
    held_out = {"path": str(task_dir / "held_out.jsonl"), "fields": {"question": "user", "answer": "assistant"}}
    return grpo_config(model_dir, task_dir, root, steps=steps, rewards=[],
                       grpo={"advantage": "teacher_reverse_kl"}, teacher={"path": str(teacher_dir)},
                       train={"lr": 3e-3, "schedule": "constant"},
                       rollout={"prompts_per_step": 8, "n": 4, "max_new_tokens": 8},
                       eval={"sources": [held_out], "at_start": True, "max_samples": 8})


def test_reverse_kl_to_the_teacher_falls(tiny_checkpoints, teacher_dir, task_dir, tmp_path, one_thread):
    cfg = load(distill_config(tiny_checkpoints["llama"], teacher_dir, task_dir, tmp_path, steps=20))
    result = run_grpo(cfg)
    rows = [json.loads(line) for line in (Path(result.run_dir) / "metrics.jsonl").read_text().splitlines()]
    train_kl = [r["teacher/reverse_kl"] for r in rows if "teacher/reverse_kl" in r]
    held_out = [r["eval/teacher_reverse_kl"] for r in rows if "eval/teacher_reverse_kl" in r]
    assert len(train_kl) == 20 and len(held_out) == 2
    # measured single-threaded: 0.36 over the first four rollouts, 0.13 over the last four
    assert sum(train_kl[-4:]) / 4 < 0.5 * sum(train_kl[:4]) / 4, train_kl
    assert held_out[1] < 0.6 * held_out[0], held_out  # measured 0.338 -> 0.133


def test_teacher_with_another_tokenizer_is_refused():
    student, teacher = build_byte_tokenizer(), build_byte_tokenizer()
    check_shared_tokenizer(student, teacher, student_name="s", teacher_name="t")
    teacher.add_tokens(["<think>"])
    with pytest.raises(ValueError, match="t has '<think>' as id 259, s lacks it"):
        check_shared_tokenizer(student, teacher, student_name="s", teacher_name="t")
    teacher = build_byte_tokenizer()
    teacher.chat_template = "{{ messages }}"
    with pytest.raises(ValueError, match="chat_template"):
        check_shared_tokenizer(student, teacher, student_name="s", teacher_name="t")


def test_distillation_config_errors(tiny_checkpoints, teacher_dir, task_dir, tmp_path):
    from posttrain.config import ConfigError

    base = distill_config(tiny_checkpoints["llama"], teacher_dir, task_dir, tmp_path, steps=1)
    with pytest.raises(ConfigError, match="teacher.path"):
        load({**base, "teacher": None})
    with pytest.raises(ConfigError, match="teacher"):
        load({**base, "grpo": {"advantage": "grpo"}, "rewards": [{"fn": "addition"}]})
