"""`posttrain data inspect`."""

from __future__ import annotations

import json

import yaml

from posttrain.cli import main
from tests.unit.data.conftest import qa_rows, write_jsonl

KEYS = {"samples", "tokens", "trained_tokens", "dropped", "truncated", "packing_efficiency", "rows"}


def test_inspect_prints_marked_samples_and_summary(tmp_path, byte_tok_dir, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", qa_rows(30) + [{"question": "only"}])
    recipe = {
        "model": {"path": str(byte_tok_dir)},
        "data": {
            "sources": [{"path": str(data), "fields": {"question": "user", "answer": "assistant"}}],
            "max_length": 512,
            "on_error": "skip",
        },
    }
    cfg = tmp_path / "recipe.yaml"
    cfg.write_text(yaml.safe_dump(recipe))
    assert main(["data", "inspect", str(cfg), "--n", "2"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(out[-1])
    assert KEYS <= set(summary)
    assert summary["samples"] == 30 and summary["dropped"] == 1 and summary["rows"] > 0
    assert 0 < summary["packing_efficiency"] <= 1
    text = "\n".join(out[:-1])
    assert text.count("--- d.jsonl line") == 2
    assert "[[answer q0" in text and "]]" in text  # piped: trained tokens between markers


def test_inspect_reports_bad_config(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump({"data": {"sources": [{"path": "x.jsonl"}], "packin": True}}))
    assert main(["data", "inspect", str(cfg), "--tokenizer", "x"]) == 2
    assert "packin" in capsys.readouterr().err
