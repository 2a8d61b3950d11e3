"""Scorers: GSM8K final answers and the demo's addition form."""

from __future__ import annotations

import json

import pytest

from posttrain.demo_task import write_task
from posttrain.rl.rewards import get_scorer
from posttrain.rl.rewards.gsm8k import final_answer


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so 3 + 4 = 7\n#### 7", "7"),
        ("#### 1,234", "1234"),
        ("#### -5", "-5"),
        ("#### 72.0", "72"),
        ("#### 0.50", "0.5"),
        ("The answer is 7.", None),
        ("#### 7 and more text", None),
    ],
)
def test_final_answer(text, expected):
    assert final_answer(text) == expected


def test_gsm8k_scorer(gsm8k_path):
    score = get_scorer("gsm8k")
    reference = json.loads(gsm8k_path.read_text().splitlines()[0])["answer"]
    number = final_answer(reference)
    assert score(f"work...\n#### {number}", reference) == {"format": 1.0, "correct": 1.0}
    assert score("#### 999999", reference) == {"format": 1.0, "correct": 0.0}
    assert score(f"the answer is {number}", reference) == {"format": 0.0, "correct": 0.0}
    with pytest.raises(ValueError, match="reference"):
        score("#### 1", "no final answer here")


def test_addition_scorer():
    score = get_scorer("addition")
    assert score("12 + 30 = 42", "12 + 30 = 42") == {"format": 1.0, "correct": 1.0}
    assert score(" 12+30=42. ", "12 + 30 = 42") == {"format": 1.0, "correct": 1.0}
    assert score("12 + 30 = 43", "12 + 30 = 42") == {"format": 1.0, "correct": 0.0}
    assert score("To add 12 and 30 ...", "12 + 30 = 42")["format"] == 0.0


def test_unknown_scorer_lists_available():
    with pytest.raises(ValueError, match="gsm8k"):
        get_scorer("nope")


def test_demo_task_held_out_pairs_are_unseen(tmp_path):
    train, held = write_task(tmp_path, train=300, held_out=20)
    pair = lambda row: row["answer"].split(" = ")[0]  # noqa: E731
    train_pairs = {pair(json.loads(x)) for x in train.read_text().splitlines()}
    held_pairs = [pair(json.loads(x)) for x in held.read_text().splitlines()]
    assert len(train_pairs) == 300 and len(held_pairs) == 20
    assert not train_pairs & set(held_pairs)
    score = get_scorer("addition")
    for line in held.read_text().splitlines():
        row = json.loads(line)
        assert score(row["answer"], row["answer"])["correct"] == 1.0
