"""The loader: exact resume (mix, 2 ranks, prefetch), disjoint ranks, epochs, padding-only."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from posttrain.config.data import DataConfig
from posttrain.data import PackedBatch, build_loader
from posttrain.data.batch import IGNORE_INDEX
from tests.unit.data.conftest import qa_rows, write_jsonl

FIELDS = {"question": "user", "answer": "assistant"}


@pytest.fixture
def two_sources(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", qa_rows(60, tag="a", seed=1))
    pq.write_table(pa.Table.from_pylist(qa_rows(30, tag="b", seed=2)), tmp_path / "b.parquet",
                   row_group_size=8)
    return [
        {"path": str(tmp_path / "a.jsonl"), "fields": FIELDS, "weight": 0.7},
        {"path": str(tmp_path / "b.parquet"), "fields": FIELDS, "weight": 0.3},
    ]


def config(sources, **kw) -> DataConfig:
    base = dict(sources=sources, max_length=512, pack_rows=4, shuffle_buffer=8, epochs=2, prefetch=2)
    return DataConfig(**{**base, **kw})


def as_tuple(batch: PackedBatch):
    return (
        batch.input_ids.tolist(),
        batch.labels.tolist(),
        batch.position_ids.tolist(),
        batch.cu_seqlens.tolist(),
        batch.max_seqlen,
        batch.num_tokens,
        batch.num_trained_tokens,
        batch.num_documents,
    )


def documents(batch: PackedBatch, pad_id: int) -> list[tuple[int, ...]]:
    ids = batch.input_ids.flatten().tolist()
    b = batch.cu_seqlens.tolist()
    docs = [tuple(ids[s:e]) for s, e in zip(b[:-1], b[1:])]
    return [d for d in docs if any(t != pad_id for t in d)]


@pytest.mark.parametrize("prefetch", [0, 2])
def test_resume_yields_exactly_the_uninterrupted_batches(two_sources, byte_tok, prefetch):
    cfg = config(two_sources, prefetch=prefetch)
    for rank in range(2):
        def make():
            return build_loader(cfg, byte_tok, batch_size=2, rank=rank, world_size=2, seed=7)

        full = [as_tuple(b) for b in make()]
        assert len(full) > 8
        for k in (0, 3, len(full) // 2 + 1, len(full)):
            loader = make()
            head = [as_tuple(next(loader)) for _ in range(k)]
            state = json.loads(json.dumps(loader.state_dict()))  # survives a JSON checkpoint
            counters = loader.counters.as_dict()
            resumed = make()
            resumed.load_state_dict(state)
            assert resumed.counters.as_dict() == counters
            assert head + [as_tuple(b) for b in resumed] == full, f"rank {rank} k {k}"
            # The same loader, run further (worker ahead), then rewound to the saved state.
            for _ in zip(range(2), loader):
                pass
            loader.load_state_dict(state)
            assert head + [as_tuple(b) for b in loader] == full, f"rank {rank} k {k} (rewound)"


def test_state_reflects_consumed_batches_not_prefetched(two_sources, byte_tok):
    cfg = config(two_sources, prefetch=4)
    loader = build_loader(cfg, byte_tok, batch_size=2, seed=7)
    first = next(loader)
    import time

    time.sleep(0.3)  # let the worker run ahead
    state = loader.state_dict()
    again = build_loader(cfg, byte_tok, batch_size=2, seed=7)
    again.load_state_dict(state)
    assert as_tuple(next(again)) == as_tuple(next(loader))
    assert first.num_documents > 0


def test_ranks_get_disjoint_data_and_equal_batch_counts(two_sources, byte_tok):
    cfg = config(two_sources, epochs=1)
    per_rank = []
    for rank in range(2):
        batches = list(build_loader(cfg, byte_tok, batch_size=3, rank=rank, world_size=2, seed=3))
        per_rank.append(batches)
    assert len(per_rank[0]) == len(per_rank[1]) > 0
    docs = [[d for b in batches for d in documents(b, byte_tok.pad_token_id)] for batches in per_rank]
    assert not set(docs[0]) & set(docs[1])
    assert len(set(docs[0])) == len(docs[0]) and len(set(docs[1])) == len(docs[1])
    single = list(build_loader(cfg, byte_tok, batch_size=6, seed=3))
    assert sorted(docs[0] + docs[1]) == sorted(d for b in single for d in documents(b, byte_tok.pad_token_id))


def test_mix_ends_with_first_exhausted_source_and_epochs_reshuffle(tmp_path, byte_tok):
    write_jsonl(tmp_path / "a.jsonl", qa_rows(20, tag="a"))
    cfg = DataConfig(sources=[{"path": str(tmp_path / "a.jsonl"), "fields": FIELDS}], epochs=3,
                     max_length=512, packing=False, prefetch=0)
    loader = build_loader(cfg, byte_tok, batch_size=1, seed=0)
    docs = [documents(b, byte_tok.pad_token_id)[0] for b in loader]
    assert len(docs) == 60 and loader.epoch == 3
    epochs = [docs[i * 20 : (i + 1) * 20] for i in range(3)]
    assert all(sorted(e) == sorted(epochs[0]) for e in epochs)
    assert epochs[0] != epochs[1]  # a fresh order every pass


def test_weights_steer_the_mix(tmp_path, byte_tok):
    write_jsonl(tmp_path / "a.jsonl", qa_rows(200, tag="a"))
    write_jsonl(tmp_path / "b.jsonl", qa_rows(200, tag="b"))
    sources = [
        {"path": str(tmp_path / "a.jsonl"), "fields": FIELDS, "weight": 3},
        {"path": str(tmp_path / "b.jsonl"), "fields": FIELDS, "weight": 1},
    ]
    cfg = DataConfig(sources=sources, epochs=1, max_length=512, packing=False, prefetch=0)
    loader = build_loader(cfg, byte_tok, batch_size=1, seed=0)
    texts = [byte_tok.decode(list(d)) for b in loader for d in documents(b, byte_tok.pad_token_id)]
    from_a = sum("user\na" in t for t in texts)
    assert from_a == 200  # the heavier source ran out first and ended the mix
    assert 0.2 < (len(texts) - from_a) / len(texts) < 0.3


def test_padding_only_batches(two_sources, byte_tok):
    cfg = config(two_sources, packing=False, epochs=1)
    for batch in build_loader(cfg, byte_tok, batch_size=4, seed=0):
        lengths = [s for s in (batch.input_ids != byte_tok.pad_token_id).sum(1).tolist()]
        assert batch.input_ids.shape[1] == max(lengths)  # padded to the longest row
        assert batch.num_documents == sum(1 for n in lengths if n)
        assert batch.labels[:, -1].eq(IGNORE_INDEX).all()


def test_seed_changes_order_and_same_seed_repeats(two_sources, byte_tok):
    cfg = config(two_sources, epochs=1)
    a = [as_tuple(b) for b in build_loader(cfg, byte_tok, batch_size=2, seed=1)]
    b = [as_tuple(b) for b in build_loader(cfg, byte_tok, batch_size=2, seed=1)]
    c = [as_tuple(b) for b in build_loader(cfg, byte_tok, batch_size=2, seed=2)]
    assert a == b and a != c


def test_overlong_drop_and_truncate(tmp_path, byte_tok):
    rows = [{"question": "q", "answer": "x" * 300}, {"question": "q", "answer": "short"}]
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    base = dict(sources=[{"path": str(path), "fields": FIELDS}], max_length=100, shuffle=False, prefetch=0)
    dropped = build_loader(DataConfig(**base), byte_tok, batch_size=1)
    assert len(list(dropped)) == 1 and dropped.counters.dropped["overlong"] == 1
    truncated = build_loader(DataConfig(**base, overlong="truncate"), byte_tok, batch_size=1)
    batches = list(truncated)
    assert truncated.counters.truncated == 1 and truncated.counters.samples == 2
    assert all(b.labels.flatten()[b.cu_seqlens[1:].long() - 1].eq(IGNORE_INDEX).all() for b in batches)


def test_samples_sharding_streams_forever(tmp_path, byte_tok):
    write_jsonl(tmp_path / "big.jsonl", qa_rows(300, tag="a"))
    sources = [{"path": str(tmp_path / "big.jsonl"), "fields": FIELDS}]
    cfg = config(sources, shard="samples", epochs=None, prefetch=0)
    loaders = [build_loader(cfg, byte_tok, batch_size=2, rank=r, world_size=2) for r in range(2)]
    docs = [[d for _ in range(5) for d in documents(next(ld), byte_tok.pad_token_id)] for ld in loaders]
    assert not set(docs[0]) & set(docs[1])


def test_resume_rejects_a_different_layout(two_sources, byte_tok):
    state = build_loader(config(two_sources), byte_tok, batch_size=2).state_dict()
    other = build_loader(config(two_sources, max_length=200), byte_tok, batch_size=2)
    with pytest.raises(ValueError, match="same sources, max_length"):
        other.load_state_dict(state)
    cfg = config(two_sources, shard="samples", epochs=None)
    state = build_loader(cfg, byte_tok, batch_size=2, rank=0, world_size=2).state_dict()
    with pytest.raises(ValueError, match="with shard: samples"):
        build_loader(cfg, byte_tok, batch_size=2).load_state_dict(state)


def test_rows_state_resumes_on_another_world_size(two_sources, byte_tok):
    """A state saved by 2 ranks continues the same global stream on 1 rank (2 rows per batch)."""
    cfg = config(two_sources, prefetch=0)
    ranks = [build_loader(cfg, byte_tok, batch_size=1, rank=r, world_size=2) for r in (0, 1)]
    for _ in range(3):
        for loader in ranks:
            next(loader)
    state = ranks[0].state_dict()
    expected = []
    for _ in range(3):
        expected.append([documents(next(loader), byte_tok.pad_token_id) for loader in ranks])
    single = build_loader(cfg, byte_tok, batch_size=2)
    single.load_state_dict(state)
    for want in expected:
        got = documents(next(single), byte_tok.pad_token_id)
        assert got == want[0] + want[1]


def test_batches_move_with_to(two_sources, byte_tok):
    batch = next(build_loader(config(two_sources, prefetch=0), byte_tok, batch_size=2))
    moved = batch.to(torch.device("cpu"))
    assert moved.cu_seqlens.dtype == torch.int32 and moved.max_seqlen == batch.max_seqlen


def test_close_then_continue_and_worker_errors_surface(two_sources, byte_tok, tmp_path):
    cfg = config(two_sources, epochs=1)
    full = [as_tuple(b) for b in build_loader(cfg, byte_tok, batch_size=2, seed=5)]
    loader = build_loader(cfg, byte_tok, batch_size=2, seed=5)
    head = [as_tuple(next(loader)) for _ in range(2)]
    loader.close()  # the worker had run ahead; closing rewinds to what was consumed
    assert head + [as_tuple(b) for b in loader] == full

    from posttrain.data import DataError

    bad = write_jsonl(tmp_path / "bad.jsonl", qa_rows(3) + ['{"question": oops}'])
    cfg = DataConfig(sources=[{"path": str(bad), "fields": FIELDS}], prefetch=2, max_length=512)
    with pytest.raises(DataError, match="bad.jsonl:line 4"):
        list(build_loader(cfg, byte_tok, batch_size=1))
