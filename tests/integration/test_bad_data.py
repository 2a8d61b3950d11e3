"""Runs whose data gives nothing (or too little) to train on fail with a clear message instead of
exporting the base model or spinning forever; each skipped row is logged once."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest

from posttrain.config import SFTConfig, load_config
from posttrain.data.skips import DataQualityError
from posttrain.recipes.sft import run_sft
from tests.integration.sft_configs import write_config

REPO = Path(__file__).resolve().parents[2]
# A line cut short, a non-string answer, a value that is not an object.
BAD_LINES = ['{"question": "What is 1 plus 1?", "answer": "1 + 1', '{"question": "What is 2 plus 2?", "answer": 4}',
             "[1, 2]"]


@pytest.fixture
def bad_config(tiny_checkpoints, tmp_path):
    rows = tmp_path / "bad.jsonl"
    rows.write_text("".join(line + "\n" for line in BAD_LINES))

    def write(**data) -> Path:
        sources = [{"path": str(rows), "fields": {"question": "user", "answer": "assistant"}}]
        return write_config(tmp_path / "cfg.yaml", tiny_checkpoints["llama"], tmp_path, tmp_path,
                            data={"sources": sources, "on_error": "skip", **data})
    return write


@pytest.mark.parametrize("epochs", [1, None], ids=["one_epoch", "repeating"])
def test_every_row_skipped_fails_and_logs_each_row_once(bad_config, caplog, epochs):
    caplog.set_level(logging.WARNING, logger="posttrain")
    cfg = load_config(bad_config(epochs=epochs), [], SFTConfig)
    started = time.monotonic()
    with pytest.raises(DataQualityError) as err:
        run_sft(cfg)
    assert time.monotonic() - started < 60  # the repeating source used to spin forever
    message = str(err.value)
    assert "rows read (100%) were malformed and skipped" in message
    assert "more than data.max_skipped_fraction (0.1)" in message and "the first: " in message
    assert "bad.jsonl:line " in message
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipped ")]
    by_line = {m.split(":")[1]: m for m in skipped}
    assert sorted(m.split(":")[1] for m in skipped) == ["line 1", "line 2", "line 3"]  # once each (shuffled)
    assert "malformed JSON" in by_line["line 1"] and "field 'answer'" in by_line["line 2"]
    assert "expected a JSON object" in by_line["line 3"]


def test_nothing_to_train_on_is_an_error_even_within_the_skip_limit(bad_config):
    cfg = load_config(bad_config(epochs=1, max_skipped_fraction=1.0), [], SFTConfig)
    with pytest.raises(DataQualityError, match=r"the data gave nothing to train on \(3 rows read, 0 samples kept, "
                                               r"skipped as malformed 3"):
        run_sft(cfg)


def test_a_repeating_source_without_a_usable_row_in_a_pass_is_an_error(tiny_checkpoints, task_dir, tmp_path):
    """Every row too long for max_length: nothing is skipped as malformed, all is dropped."""
    path = write_config(tmp_path / "cfg.yaml", tiny_checkpoints["llama"], task_dir, tmp_path,
                        data={"max_length": 8, "epochs": None})
    with pytest.raises(DataQualityError, match=r"a whole pass over the data \(.*train.jsonl\) gave no usable "
                                               r"sample.*dropped: overlong"):
        run_sft(load_config(path, [], SFTConfig))


def test_the_cli_exits_2_with_the_message(bad_config):
    proc = subprocess.run(
        [sys.executable, "-m", "posttrain", "sft", str(bad_config(epochs=1))], cwd=REPO, capture_output=True,
        text=True, timeout=300, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert sum(line.startswith("posttrain: skipped ") for line in lines) == 3
    assert lines[-1].startswith("posttrain: error: 3 of 3 rows read (100%) were malformed and skipped")
    assert proc.stdout == ""  # no summary of a "finished" run
