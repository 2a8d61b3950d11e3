"""DPO data end to end: bad pairs fail naming file, line and field (or are skipped and counted),
pairs stay whole in packed and padded rows with overlong ones counted, and the real HH pairs
render whole with exactly their 8 bad rows named."""

from __future__ import annotations

import gzip
import json

import pytest

from posttrain.data.batch import IGNORE_INDEX
from posttrain.data.pairs import PAIR_LINE_BITS
from posttrain.data.sources import DataError
from posttrain.train.reference_cache import COMPLETE_FILE
from tests.integration.dpo_configs import cache_dirs, hh_source, per_step, run, synthetic_pairs, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")  # see the fixture


# ------------------------------------------------------------------------------------ bad rows


GOOD = synthetic_pairs(12)
BAD_ROWS = {
    "chosen_equals_rejected": ({"prompt": "Hi", "chosen": "Same.", "rejected": "Same."},
                               "rejected", "equals chosen"),
    "empty_reply": ({"prompt": "Hi", "chosen": "Hello.", "rejected": "  "}, "rejected[0].content", "empty reply"),
    "missing_rejected": ({"prompt": "Hi", "chosen": "Hello."}, "rejected", "missing; row has ['chosen', 'prompt']"),
    "earlier_turns_differ": ({
        "chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                   {"role": "user", "content": "Add 2 and 2."}, {"role": "assistant", "content": "4."}],
        "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Go away."},
                     {"role": "user", "content": "Add 2 and 2."}, {"role": "assistant", "content": "5."}],
    }, "chosen", "chosen and rejected differ before their last reply"),
    # Explicit prompt, but chosen's untrained first reply makes its prompt tokens longer.
    "prompt_renders_differently": ({
        "prompt": "Hi",
        "chosen": [{"role": "assistant", "content": "Hm.", "train": False}, {"role": "user", "content": "Well?"},
                   {"role": "assistant", "content": "Hello."}],
        "rejected": "No.",
    }, "rejected", "the prompt renders to different tokens in chosen and rejected"),
}


@pytest.mark.parametrize("reference", ["precompute", "live"])
@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_a_bad_row_fails_naming_file_line_and_field(model_dir, tmp_path, case, reference):
    """Raised by the reference pass (precompute) or the training loader (live)."""
    row, field, words = BAD_ROWS[case]
    data = write_jsonl(tmp_path / "pairs.jsonl", GOOD[:4] + [row] + GOOD[4:])
    with pytest.raises(DataError) as err:
        run(model_dir, data, tmp_path, steps=1, data={"on_error": "raise"}, dpo={"reference": reference})
    assert str(err.value).startswith(f"{data}:line 5: field '{field}': {words}"), str(err.value)
    assert (err.value.path, err.value.where, err.value.field) == (str(data), "line 5", field)


def test_bad_rows_are_skipped_and_counted(model_dir, tmp_path, skipped_rows):
    rows = list(GOOD)
    for i, case in enumerate(BAD_ROWS):
        rows.insert(2 * i + 1, BAD_ROWS[case][0])  # lines 2, 4, 6, 8, 10
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    result = run(model_dir, data, tmp_path, steps=2,
                 data={"on_error": "skip", "max_skipped_fraction": 0.5, "epochs": 1})
    assert result.status in ("finished", "data_exhausted") and result.steps >= 1
    for metrics in per_step(result.run_dir).values():
        assert metrics["data/skipped_errors"] == len(BAD_ROWS)
    (directory,) = cache_dirs(result.run_dir)
    assert json.loads((directory / COMPLETE_FILE).read_text())["pairs_scored"] == len(GOOD)
    for line, (case, (_, field, words)) in zip((2, 4, 6, 8, 10), BAD_ROWS.items()):
        assert any(m.startswith(f"{data}:line {line}: field '{field}': {words}") for m in skipped_rows), \
            (case, skipped_rows)


# ------------------------------------------------------------------------------------ pairs in the data layer


@pytest.mark.parametrize("packing", [True, False], ids=["packed", "padded"])
@pytest.mark.parametrize("overlong", ["drop", "truncate"])
def test_pairs_stay_whole_in_rows_and_overlong_pairs_are_counted(model_dir, tmp_path, packing, overlong):
    """max_length 256 holds one or two pairs per row (pairs are 113-220 tokens), so the 32 pairs
    fill many rows; one more pair is over max_length. A pair's documents share a row, chosen
    first (its scored tokens are the chosen reply), and the overlong pair is dropped or cut to
    max_length // 2 per document, counted once."""
    from transformers import AutoTokenizer

    from posttrain.config.data import DataConfig
    from posttrain.data.loader import build_loader

    rows = synthetic_pairs(32)
    rows.insert(7, {"prompt": "Tell a long story.", "chosen": "Once upon a time " * 20, "rejected": "No."})
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    cfg = DataConfig(sources=[{"path": str(path)}], task="preference", max_length=256, packing=packing,
                     overlong=overlong, shuffle=True, seed=3, prefetch=0, epochs=1, pack_rows=4)
    seen, row_count = {}, 0
    with build_loader(cfg, tokenizer, batch_size=2) as loader:
        for batch in loader:
            assert batch.input_ids.shape[1] <= 256
            docs, groups = batch.document_ids, batch.groups.tolist()
            for r in range(docs.shape[0]):
                row_docs = sorted(set(docs[r][docs[r] >= 0].tolist()))
                row_count += bool(row_docs)
                row_groups = [groups[d] for d in row_docs]
                assert len(row_groups) % 2 == 0 and row_groups[0::2] == row_groups[1::2], row_groups
            for d in range(0, batch.num_documents, 2):
                pair = groups[d]
                replies = []
                for doc in (d, d + 1):
                    mask = (docs == doc) & (batch.labels != IGNORE_INDEX)
                    replies.append(tokenizer.decode(batch.labels[mask].tolist()))
                assert pair not in seen  # each pair once per epoch
                seen[pair] = replies
        counters = loader.counters
    lines = {pair & ((1 << PAIR_LINE_BITS) - 1): replies for pair, replies in seen.items()}
    long_line = 8
    expected_lines = set(range(1, 34)) - ({long_line} if overlong == "drop" else set())
    assert set(lines) == expected_lines
    assert row_count >= 17  # many rows: at most two pairs each
    for line, (chosen, rejected) in lines.items():
        row = rows[line - 1]
        if line == long_line:  # cut: a prefix of the reply (and no end token)
            assert len(chosen) < len(row["chosen"]) and row["chosen"].startswith(chosen) and chosen
            assert rejected.startswith(row["rejected"])
        else:
            assert chosen.startswith(row["chosen"]) and rejected.startswith(row["rejected"]), (chosen, row)
    if overlong == "drop":
        assert counters.dropped["overlong"] == 1 and counters.truncated == 0 and counters.samples == 64
    else:
        assert counters.dropped["overlong"] == 0 and counters.truncated == 1 and counters.samples == 66


def test_real_pairs_render_whole_and_their_bad_rows_are_named(model_dir, hh_path, skipped_rows):
    """The whole HH file through the loader: 8 rows are bad (4 empty chosen replies; 4 pairs whose
    dialogues differ before the last reply, see shared/data/README.md), each named; every other
    pair stays whole, its scored tokens the last assistant reply of each dialogue."""
    from transformers import AutoTokenizer

    from posttrain.config.data import DataConfig
    from posttrain.data.loader import build_loader

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    cfg = DataConfig(sources=[hh_source(hh_path)], task="preference", max_length=512, on_error="skip",
                     max_skipped_fraction=0.5, shuffle=False, prefetch=0, epochs=1)
    kept = {}
    with build_loader(cfg, tokenizer, batch_size=4) as loader:
        for batch in loader:
            docs, groups = batch.document_ids, batch.groups.tolist()
            assert groups[0::2] == groups[1::2]
            for r in range(docs.shape[0]):
                row_groups = [groups[d] for d in sorted(set(docs[r][docs[r] >= 0].tolist()))]
                assert len(row_groups) % 2 == 0 and row_groups[0::2] == row_groups[1::2]
            for d in range(0, batch.num_documents, 2):
                kept[groups[d] & ((1 << PAIR_LINE_BITS) - 1)] = [
                    tokenizer.decode(batch.labels[(docs == doc) & (batch.labels != IGNORE_INDEX)].tolist())
                    for doc in (d, d + 1)]
        counters = loader.counters
    assert counters.rows_read == 1800 and counters.skipped_errors == 8 and counters.truncated == 0
    assert len(kept) == counters.samples // 2 == 1800 - 8 - counters.dropped["overlong"] > 300
    assert len(skipped_rows) == 8
    for line in (239, 502, 663, 864):
        assert f"{hh_path}:line {line}: field 'chosen[0].content': empty reply" in skipped_rows
    for line in (867, 1372, 1388, 1608):
        assert any(m.startswith(f"{hh_path}:line {line}: field 'chosen': chosen and rejected differ before "
                                "their last reply") for m in skipped_rows), skipped_rows
    with gzip.open(hh_path, "rt") as lines:
        raw = {i + 1: json.loads(text) for i, text in enumerate(lines)}
    for line, (chosen, rejected) in kept.items():
        for scored, dialogue in ((chosen, raw[line]["chosen"]), (rejected, raw[line]["rejected"])):
            last = dialogue.rsplit("\n\nAssistant:", 1)[1].strip()
            assert scored.startswith(last), (line, scored[:80], last[:80])
