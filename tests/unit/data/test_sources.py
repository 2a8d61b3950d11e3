"""Readers, row schemas and bad-input errors (file, line, field)."""

from __future__ import annotations

import json

import pytest

from posttrain.config.data import DataConfig, SourceConfig
from posttrain.data.loader import Pipeline
from posttrain.data.rows import Conversation, FieldError, PreferenceExample, PromptExample, parse_row
from posttrain.data.sources import DataError, open_source
from tests.unit.data.conftest import qa_rows, write_jsonl

GSM8K_FIELDS = {"question": "user", "answer": "assistant"}


def drain(reader, cursor=None) -> list:
    return [row.load() for row in reader.iter_from(reader.start() if cursor is None else cursor)]


@pytest.fixture
def rows():
    return qa_rows(25)


def test_all_formats_stream_the_same_rows(tmp_path, rows):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    write_jsonl(tmp_path / "d.jsonl", rows)
    (tmp_path / "d.json").write_text(json.dumps(rows, indent=2))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet", row_group_size=7)
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "dd"))
    for name in ("d.jsonl", "d.json", "d.parquet", "ds", "dd"):
        reader = open_source(SourceConfig(path=str(tmp_path / name)))
        all_rows = list(reader.iter_from(reader.start()))
        assert [r.load() for r in all_rows] == rows, name
        # Resume from the middle and re-read scattered rows by cursor.
        assert drain(reader, all_rows[11].cursor) == rows[11:], name
        picked = reader.read_many([all_rows[i].cursor for i in (20, 3, 15)])
        assert [r.load() for r in picked] == [rows[i] for i in (20, 3, 15)], name


def test_json_array_reports_lines(tmp_path):
    (tmp_path / "d.json").write_text('[\n  {"a": 1},\n  {"a": 2}\n]\n')
    lines = [r.line for r in open_source(SourceConfig(path=str(tmp_path / "d.json"))).iter_from(0)]
    assert lines == [2, 3]


def test_field_mapping_gsm8k_and_rl(rows):
    conv = parse_row(rows[0], SourceConfig(path="x", fields=GSM8K_FIELDS), task="sft")
    assert isinstance(conv, Conversation)
    assert conv.messages == [
        {"role": "user", "content": rows[0]["question"]},
        {"role": "assistant", "content": rows[0]["answer"]},
    ]
    # Key order does not decide turn order (a key-sorting YAML writer puts "answer" first).
    sorted_keys = {"answer": "assistant", "note": "system", "question": "user"}
    swapped = parse_row({**rows[0], "note": "Be brief."}, SourceConfig(path="x", fields=sorted_keys), task="sft")
    assert [m["role"] for m in swapped.messages] == ["system", "user", "assistant"]
    assert swapped.messages[1:] == conv.messages
    rl = parse_row(rows[0], SourceConfig(path="x", fields={"question": "prompt", "answer": "reference"}),
                   task="prompt")
    assert isinstance(rl, PromptExample) and rl.reference == rows[0]["answer"]
    assert rl.messages == [{"role": "user", "content": rows[0]["question"]}]


def test_prompt_completion_and_preference_formats():
    source = SourceConfig(path="x", system_prompt="Be nice.")
    conv = parse_row({"prompt": "Hi", "completion": "Hello"}, source, task="sft")
    assert [m["role"] for m in conv.messages] == ["system", "user", "assistant"]
    assert conv.messages[1]["train"] is False
    pair = parse_row({"prompt": "Hi", "chosen": "Hello", "rejected": "Go away"}, source, task="preference")
    assert isinstance(pair, PreferenceExample)
    assert pair.chosen == [{"role": "assistant", "content": "Hello"}]
    implicit = parse_row(
        {
            "chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
            "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "No"}],
        },
        SourceConfig(path="x"),
        task="preference",
    )
    assert implicit.prompt == [{"role": "user", "content": "Hi", "train": False}]
    with pytest.raises(FieldError, match="task: preference"):
        parse_row({"chosen": "a", "rejected": "b"}, SourceConfig(path="x"), task="sft")


GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
BAD_LINES = [
    ('{"messages": [', None, "malformed JSON"),
    ({"question": "no answer here"}, "answer", "missing"),
    ({"messages": [{"role": "robot", "content": "beep"}]}, "messages[0].role", "unknown role"),
    ({"messages": []}, "messages", "empty conversation"),
]


@pytest.mark.parametrize("bad,field,reason", BAD_LINES, ids=["json", "missing", "role", "empty"])
def test_bad_input_names_file_line_and_field(tmp_path, byte_tok, bad, field, reason):
    fields = GSM8K_FIELDS if field == "answer" else {}
    good = {"question": "q", "answer": "a"} if fields else GOOD
    path = write_jsonl(tmp_path / "bad.jsonl", [good, good, bad, good])
    cfg = DataConfig(sources=[{"path": str(path), "fields": fields}], shuffle=False, max_length=128)
    pipeline = Pipeline(cfg, byte_tok, batch_size=1)
    with pytest.raises(DataError) as err:
        while True:
            pipeline.next_rows()
    message = str(err.value)
    assert str(path) in message and "line 3" in message and reason in message
    assert err.value.field == field
    if field:
        assert f"field '{field}'" in message


@pytest.mark.parametrize("line, reason", [
    ('{"question": "q", "answer": "a', "at column 29: Unterminated string starting at"),
    ('{"question": "q", "answer": "a"', "at column 32: Expecting ',' delimiter"),  # was: column 1
])
def test_a_line_cut_short_is_reported_at_its_real_column(tmp_path, line, reason):
    from posttrain.data.sources import JsonlReader

    path = tmp_path / "cut.jsonl"
    path.write_text(line + "\n")
    row = next(JsonlReader(str(path)).iter_from([0, 1]))
    with pytest.raises(DataError) as err:
        row.load()
    assert str(err.value) == f"{path}:line 1: malformed JSON {reason}"


def test_on_error_skip_counts(tmp_path, byte_tok):
    lines = [GOOD] + [bad for bad, _, _ in BAD_LINES if not isinstance(bad, dict) or "question" not in bad]
    lines += [{"messages": [{"role": "user", "content": "only a question"}]}, GOOD]
    path = write_jsonl(tmp_path / "mixed.jsonl", lines)
    cfg = DataConfig(sources=[{"path": str(path)}], shuffle=False, on_error="skip", max_length=128,
                     max_skipped_fraction=1.0)
    pipeline = Pipeline(cfg, byte_tok, batch_size=1)
    with pytest.raises(StopIteration):
        while True:
            pipeline.next_rows()
    c = pipeline.counters
    assert c.skipped_errors == 3 and c.samples == 2 and c.dropped["no_trained_tokens"] == 1


def test_missing_file_fails_early(byte_tok):
    cfg = DataConfig(sources=[{"path": "/nonexistent/data.jsonl"}])
    with pytest.raises(FileNotFoundError, match="nonexistent"):
        Pipeline(cfg, byte_tok, batch_size=1)


def test_config_rejects_unknown_keys_and_targets():
    with pytest.raises(ValueError):
        DataConfig(sources=[{"path": "x"}], packin=True)
    with pytest.raises(ValueError, match="unknown target"):
        DataConfig(sources=[{"path": "x", "fields": {"q": "bot"}}])
    with pytest.raises(ValueError, match="epochs: null"):
        DataConfig(sources=[{"path": "x"}], shard="samples")
