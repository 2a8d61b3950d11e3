"""Preference rows in the forms users bring (explicit prompt, implicit prompt, raw dialogue text),
their bad-input errors, gzip JSONL, row ranges, and the stable pair ids."""

from __future__ import annotations

import gzip

import pytest

from posttrain.config.data import DataConfig, SourceConfig
from posttrain.data.loader import build_loader
from posttrain.data.pairs import PAIR_LINE_BITS, pair_id, source_key
from posttrain.data.rows import FieldError, parse_dialogue, parse_row
from posttrain.data.sources import DataError, open_source
from tests.unit.data.conftest import write_jsonl

HH = {"\n\nHuman:": "user", "\n\nAssistant:": "assistant"}


def hh_row(question: str, good: str, bad: str, history: str = "") -> dict:
    head = f"{history}\n\nHuman: {question}\n\nAssistant:"
    return {"chosen": f"{head} {good}", "rejected": f"{head} {bad}"}


def test_dialogue_text_becomes_messages():
    text = "\n\nHuman: hi there\n\nAssistant: hello\n\nHuman: how are you?\n\nAssistant: fine"
    assert parse_dialogue(text, HH, "chosen") == [
        {"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "how are you?"}, {"role": "assistant", "content": "fine"},
    ]
    with pytest.raises(FieldError, match="text before the first dialogue marker"):
        parse_dialogue("preamble\n\nHuman: hi", HH, "chosen")
    with pytest.raises(FieldError, match="no dialogue marker"):
        parse_dialogue("just text", HH, "chosen")


def test_implicit_prompt_from_dialogue_rows():
    source = SourceConfig(path="x", dialogue=HH)
    pair = parse_row(hh_row("why?", "because", "no", history="\n\nHuman: a\n\nAssistant: b"), source,
                     task="preference")
    assert [m["content"] for m in pair.prompt] == ["a", "b", "why?"]
    assert pair.chosen == [{"role": "assistant", "content": "because"}]
    assert pair.rejected == [{"role": "assistant", "content": "no"}]


@pytest.mark.parametrize("row, field, reason", [
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, "rejected", "equals chosen"),
    ({"prompt": "q", "chosen": "  ", "rejected": "no"}, "chosen[0].content", "empty reply"),
    ({"prompt": "q", "chosen": "yes"}, "rejected", "missing"),
    (hh_row("q", "", "no"), "chosen[0].content", "empty reply"),
    ({"chosen": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d",
      "rejected": "\n\nHuman: a\n\nAssistant: x\n\nHuman: c\n\nAssistant: y"}, "chosen", "differ before their last reply"),
], ids=["equal", "empty", "missing", "empty-dialogue", "earlier-turn-differs"])
def test_bad_pairs_name_the_field(row, field, reason):
    with pytest.raises(FieldError) as err:
        parse_row(row, SourceConfig(path="x", dialogue=None if "prompt" in row else HH), task="preference")
    assert err.value.field == field and reason in str(err.value)


def test_bad_pair_through_the_loader_names_file_and_line(tmp_path, byte_tok):
    rows = [hh_row(f"q{i}", f"good {i}", f"bad {i}") for i in range(4)]
    rows[2] = hh_row("q", "same", "same")
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    cfg = DataConfig(task="preference", sources=[{"path": str(path), "dialogue": HH}], shuffle=False, prefetch=0,
                     max_length=256)
    with pytest.raises(DataError) as err, build_loader(cfg, byte_tok, batch_size=1) as loader:
        list(loader)
    assert f"{path}:line 3: field 'rejected': equals chosen" in str(err.value)
    skipping = cfg.model_copy(update={"on_error": "skip", "max_skipped_fraction": 0.5})
    with build_loader(skipping, byte_tok, batch_size=1) as loader:
        groups = [g for batch in loader for g in batch.groups.tolist()]
        assert loader.counters.skipped_errors == 1 and len(groups) == 6


def test_gzip_jsonl_reads_like_plain_jsonl_and_resumes(tmp_path):
    rows = [{"i": i, "text": "x" * i} for i in range(30)]
    plain = write_jsonl(tmp_path / "d.jsonl", rows)
    packed = tmp_path / "d.jsonl.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    for path in (plain, packed):
        reader = open_source(SourceConfig(path=str(path)))
        read = list(reader.iter_from(reader.start()))
        assert [r.load() for r in read] == rows
        assert [r.load()["i"] for r in reader.iter_from(read[17].cursor)] == list(range(17, 30))
        assert [r.load()["i"] for r in reader.read_many([read[25].cursor, read[3].cursor])] == [25, 3]


def test_row_range_keeps_original_lines_and_resumes(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"i": i} for i in range(20)])
    reader = open_source(SourceConfig(path=str(path), rows=(5, 12)))
    read = list(reader.iter_from(reader.start()))
    assert [r.load()["i"] for r in read] == list(range(5, 12))
    assert [r.line for r in read] == list(range(6, 13))  # 1-based file lines, as in messages
    assert [r.load()["i"] for r in reader.iter_from(read[3].cursor)] == list(range(8, 12))
    assert [r.load()["i"] for r in reader.read_many([read[6].cursor, read[0].cursor])] == [11, 5]
    tail = open_source(SourceConfig(path=str(path), rows=(18, None)))
    assert [r.load()["i"] for r in tail.iter_from(tail.start())] == [18, 19]
    with pytest.raises(ValueError, match="rows"):
        SourceConfig(path="x", rows=(4, 4))


def test_pair_ids_are_stable_and_distinct_across_sources(tmp_path, byte_tok):
    a = write_jsonl(tmp_path / "a.jsonl", [hh_row(f"q{i}", f"yes {i}", f"no {i}") for i in range(6)])
    b = write_jsonl(tmp_path / "b.jsonl", [hh_row(f"q{i}", f"yes {i}", f"no {i}") for i in range(6)])
    assert source_key(SourceConfig(path=str(a))) != source_key(SourceConfig(path=str(b)))
    assert pair_id(3, 7) == (3 << PAIR_LINE_BITS) | 7

    def ids(sources, shuffle, seed=0):
        cfg = DataConfig(task="preference", sources=sources, shuffle=shuffle, prefetch=0, max_length=512, seed=seed)
        with build_loader(cfg, byte_tok, batch_size=2) as loader:
            return sorted({g for batch in loader for g in batch.groups.tolist()})

    one = [{"path": str(a), "dialogue": HH}]
    other = [{"path": str(b), "dialogue": HH}]
    assert len(ids(one, False)) == 6
    assert ids(one, False) == ids(one, True, seed=3)  # independent of the order
    mixed = set(ids([{**other[0], "weight": 0.01}] + one, False))  # nor on a source's position
    assert mixed <= set(ids(one, False)) | set(ids(other, False)) and mixed & set(ids(one, False))
    assert not set(ids(one, False)) & set(ids(other, False))  # another file: other ids
