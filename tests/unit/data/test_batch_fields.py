"""Typed batch extras: document ids, pair/group ids and per-token float fields travel through
packing, collate, `.to()` and the loader's resumable state."""

from __future__ import annotations

import pytest
import torch

from posttrain.config.data import DataConfig
from posttrain.data import build_loader
from posttrain.data.batch import IGNORE_INDEX, Sample, collate
from posttrain.data.packing import BestFitPacker
from tests.unit.data.conftest import write_jsonl


def doc(k: int, length: int, group: int | None = None) -> Sample:
    """Document k: ids 100k + t, field `score` = k + t / 100 (so every token's value is unique)."""
    ids = [100 * k + t for t in range(length)]
    labels = ids[1:] + [IGNORE_INDEX]
    return Sample(ids, labels, fields={"score": [k + t / 100 for t in range(length)]}, group=group)


def test_collate_places_fields_document_ids_and_groups():
    rows = [[doc(1, 3, group=7), doc(2, 2, group=7)], [doc(3, 4)], []]
    batch = collate(rows, row_length=6, pad_id=0)
    assert batch.document_ids.tolist() == [[0, 0, 0, 1, 1, -1], [2, 2, 2, 2, -1, -1], [-1] * 6]
    assert batch.groups.tolist() == [7, 7, -1]
    assert batch.num_documents == 3
    score = batch.fields["score"]
    assert score.dtype == torch.float32 and score.shape == (3, 6)
    expected = [[1.0, 1.01, 1.02, 2.0, 2.01, 0.0], [3.0, 3.01, 3.02, 3.03, 0.0, 0.0], [0.0] * 6]
    torch.testing.assert_close(score, torch.tensor(expected), rtol=0, atol=1e-6)


def test_documents_with_different_fields_are_refused():
    plain = Sample([1, 2], [2, IGNORE_INDEX])
    with pytest.raises(ValueError, match="different fields"):
        collate([[doc(1, 2), plain]], row_length=4, pad_id=0)


def test_fields_follow_their_tokens_through_packing_and_to():
    packer = BestFitPacker(capacity=16, window_rows=2, seed=0)
    rows = []
    for k in range(1, 12):
        rows += packer.add([doc(k, 2 + k % 5)])
    rows += packer.flush()
    batch = collate(rows, row_length=16, pad_id=0).to("cpu")
    ids, score, docs = batch.input_ids, batch.fields["score"], batch.document_ids
    real = docs >= 0
    # Each real token's field value is recoverable from its id: document k, position t.
    k, t = ids // 100, ids % 100
    torch.testing.assert_close(score[real], (k + t / 100).float()[real], rtol=0, atol=1e-6)
    assert bool((score[~real] == 0).all())
    # Document ids count the real documents in row-major order.
    assert sorted(set(docs[real].tolist())) == list(range(batch.num_documents))


def test_with_fields_adds_checked_fields():
    batch = collate([[doc(1, 3)]], row_length=4, pad_id=0)
    more = batch.with_fields(advantage=torch.ones(1, 4))
    assert set(more.fields) == {"score", "advantage"} and set(batch.fields) == {"score"}
    with pytest.raises(ValueError, match="field 'bad' has shape"):
        batch.with_fields(bad=torch.ones(2, 4))


def test_sample_state_round_trip_keeps_fields_and_group():
    sample = doc(4, 3, group=11)
    assert Sample.from_dict(sample.to_dict()) == sample
    cut = sample.truncated(2)
    assert cut.fields == {"score": [4.0, 4.01]} and cut.group == 11


def test_preference_pairs_share_a_group_id_through_the_loader(byte_tok, tmp_path):
    rows = [{"prompt": f"q{i}?", "chosen": f"yes {i}", "rejected": f"no {i} " * (1 + i % 3)} for i in range(6)]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    cfg = DataConfig(sources=[{"path": str(path)}], task="preference", max_length=128, shuffle=False,
                     prefetch=0, epochs=1, pack_rows=2)
    groups = []
    with build_loader(cfg, byte_tok, batch_size=1) as loader:
        for batch in loader:
            g = batch.groups.tolist()
            assert len(g) % 2 == 0 and g[0::2] == g[1::2], "chosen and rejected share one group"
            groups += g[0::2]
    assert sorted(groups) == sorted(set(groups)) and len(groups) == 6  # one distinct id per pair
