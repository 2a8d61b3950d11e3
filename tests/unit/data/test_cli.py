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
        "tokenizer": str(byte_tok_dir),  # a data-only file names its tokenizer (a recipe: model.path)
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
    assert out[0].startswith("legend: [[...]] trained tokens")
    text = "\n".join(out[1:-1])
    assert text.count("--- d.jsonl line") == 2
    assert "[[answer q0" in text and "]]" in text  # piped: trained tokens between markers


def test_inspect_reports_bad_config(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump({"data": {"sources": [{"path": "x.jsonl"}], "packin": True}}))
    assert main(["data", "inspect", str(cfg), "--tokenizer", "x"]) == 2
    assert "packin" in capsys.readouterr().err


def test_inspect_loads_the_config_like_the_recipe_commands(tmp_path, byte_tok_dir, capsys):
    """Line numbers, did-you-mean, unknown top-level keys, key=value overrides: one loader."""
    data = write_jsonl(tmp_path / "d.jsonl", qa_rows(4))
    cfg = tmp_path / "recipe.yaml"
    cfg.write_text(
        f"tokenizer: {byte_tok_dir}\n"
        "trian:\n  steps: 3\n"
        "data:\n"
        f"  sources:\n    - path: {data}\n      fields: {{question: user, answer: assistant}}\n"
        "  packin: false\n"
    )
    assert main(["data", "inspect", str(cfg), "data.max_lenght=64"]) == 2
    err = capsys.readouterr().err
    assert f"invalid config {cfg} (3 problems)" in err
    assert f"data.packin: unknown key; did you mean data.packing?" in err and f"[{cfg}:8]" in err
    assert f"trian: unknown key; did you mean train?" in err and f"[{cfg}:2]" in err
    assert "data.max_lenght: unknown key; did you mean data.max_length?" in err
    assert "[override 'data.max_lenght=64']" in err

    good = cfg.read_text().replace("trian:\n  steps: 3\n", "train:\n  steps: 3\n").replace("packin", "packing")
    cfg.write_text(good)
    assert main(["data", "inspect", str(cfg), "data.max_length=512", "--n", "1"]) == 0
    out = capsys.readouterr().out
    assert "--- d.jsonl line 1:" in out and json.loads(out.splitlines()[-1])["samples"] == 4


def test_escaped_control_strings_are_marked_apart_from_real_control_tokens(tmp_path, smollm2_dir, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [{"messages": [
        {"role": "user", "content": "Say <|im_end|> please"}, {"role": "assistant", "content": "ok <|im_end|>"}]}])
    cfg = tmp_path / "recipe.yaml"
    cfg.write_text(yaml.safe_dump({"tokenizer": str(smollm2_dir), "data": {
        "sources": [{"path": str(data)}], "special_tokens": "escape", "max_length": 256}}))
    assert main(["data", "inspect", str(cfg), "--n", "1"]) == 0
    out = capsys.readouterr().out
    assert "«...» a control-token string found in the content and encoded as plain text" in out
    assert "Say «<|im_end|>» please<|im_end|>" in out  # escaped text vs the template's own token
    assert "[[ok «<|im_end|>»<|im_end|>]]" in out


def test_inspect_refuses_prompt_rows_with_a_reason(tmp_path, byte_tok_dir, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", qa_rows(3))
    recipe = {"tokenizer": str(byte_tok_dir), "data": {
        "task": "prompt", "sources": [{"path": str(data), "fields": {"question": "prompt", "answer": "reference"}}]}}
    cfg = tmp_path / "recipe.yaml"
    cfg.write_text(yaml.safe_dump(recipe))
    assert main(["data", "inspect", str(cfg)]) == 2
    assert "prompt rows (data.task: prompt)" in capsys.readouterr().err


def test_inspect_reads_a_distillation_student_made_from_its_teacher(tmp_path, byte_tok_dir, capsys):
    """`model.init_from` has no path yet: the teacher's tokenizer is the student's."""
    data = write_jsonl(tmp_path / "d.jsonl", qa_rows(4))
    cfg = tmp_path / "distill.yaml"
    cfg.write_text(yaml.safe_dump({
        "model": {"init_from": {"teacher": True, "layers": [0, 2]}}, "teacher": {"path": str(byte_tok_dir)},
        "data": {"sources": [{"path": str(data), "fields": {"question": "user", "answer": "assistant"}}]},
    }))
    assert main(["data", "inspect", str(cfg), "--n", "1"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["samples"] == 4
