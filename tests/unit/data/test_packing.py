"""Packing keeps documents whole and isolated; the PackedBatch layout; efficiency on GSM8K."""

from __future__ import annotations

import random

import torch

from posttrain.config.data import DataConfig
from posttrain.data import build_loader
from posttrain.data.batch import IGNORE_INDEX, PackedBatch, Sample, collate
from posttrain.data.packing import BestFitPacker

PAD = 0


def make_samples(n: int, seed: int = 0, lo: int = 3, hi: int = 90) -> list[Sample]:
    """Samples whose ids name the document (doc k holds ids 1000*k + position)."""
    rng = random.Random(seed)
    samples = []
    for k in range(1, n + 1):
        length = rng.randint(lo, hi)
        ids = [1000 * k + i for i in range(length)]
        labels = [ids[i + 1] if rng.random() < 0.6 else IGNORE_INDEX for i in range(length - 1)]
        samples.append(Sample(ids, labels + [IGNORE_INDEX]))
    return samples


def segments(batch: PackedBatch) -> list[tuple[int, int]]:
    b = batch.cu_seqlens.tolist()
    return list(zip(b[:-1], b[1:]))


def check_layout(batch: PackedBatch, pad_id: int = PAD) -> list[Sample]:
    """Check the PackedBatch contract; return the real documents it holds."""
    B, L = batch.input_ids.shape
    for t in (batch.input_ids, batch.labels, batch.position_ids):
        assert t.dtype == torch.long and t.shape == (B, L)
    assert batch.cu_seqlens.dtype == torch.int32 and batch.cu_seqlens[0] == 0
    assert batch.cu_seqlens[-1] == B * L
    ids, labels, pos = batch.input_ids.flatten(), batch.labels.flatten(), batch.position_ids.flatten()
    docs, pad_segments = [], 0
    for s, e in segments(batch):
        assert e > s and s // L == (e - 1) // L, "a segment crosses a row boundary"
        assert pos[s:e].tolist() == list(range(e - s)), "positions must restart per segment"
        assert labels[e - 1] == IGNORE_INDEX, "a document's last position predicts nothing"
        if bool((ids[s:e] == pad_id).all()):  # test documents never hold the pad id
            assert e % L == 0, "padding is the trailing pseudo-document of its row"
            assert bool((labels[s:e] == IGNORE_INDEX).all())
            pad_segments += 1
            continue
        docs.append(Sample(ids[s:e].tolist(), labels[s:e].tolist()))
    assert batch.max_seqlen == max(e - s for s, e in segments(batch))
    assert batch.num_documents == len(docs)
    assert batch.num_tokens == sum(len(d) for d in docs)
    assert batch.num_trained_tokens == int((batch.labels != IGNORE_INDEX).sum())
    assert pad_segments <= B
    return docs


def test_best_fit_packs_whole_documents_once():
    samples = make_samples(300)
    packer = BestFitPacker(capacity=256, window_rows=4)
    rows = []
    for s in samples:
        rows += packer.add([s])
    rows += packer.flush()
    assert all(sum(len(s) for s in row) <= 256 for row in rows)
    seen = sorted(s.input_ids[0] for row in rows for s in row)
    assert seen == sorted(s.input_ids[0] for s in samples)
    # Best fit over a bounded window does far better than one document per row.
    assert sum(len(s) for s in samples) / (len(rows) * 256) > 0.9


def test_collate_layout_and_isolation():
    samples = make_samples(40)
    packer = BestFitPacker(capacity=200, window_rows=3)
    rows = [r for s in samples for r in packer.add([s])] + packer.flush()
    docs = []
    for i in range(0, len(rows), 4):
        batch = collate(rows[i : i + 4], 200, PAD)
        docs += check_layout(batch)
    by_first = {d.input_ids[0]: d for d in docs}
    assert len(by_first) == len(samples)
    for s in samples:
        d = by_first[s.input_ids[0]]
        assert d.input_ids == s.input_ids and d.labels == s.labels


def test_padding_only_rows_and_empty_rows():
    a, b = make_samples(2, lo=5, hi=9)
    batch = collate([[a], [b], []], max(len(a), len(b)), PAD)
    assert check_layout(batch) == [a, b]
    assert batch.num_documents == 2
    assert batch.cu_seqlens.numel() <= 2 + 3 + 1
    moved = batch.to("cpu")
    assert isinstance(moved, PackedBatch) and torch.equal(moved.input_ids, batch.input_ids)


def test_weights_travel_when_present():
    a = Sample([1, 2, 3], [2, 3, IGNORE_INDEX], weights=[0.5, 0.5, 0.0])
    b = Sample([4, 5], [5, IGNORE_INDEX])
    batch = collate([[a, b]], 8, PAD)
    assert batch.weights.tolist()[0] == [0.5, 0.5, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0]


def test_gsm8k_efficiency_at_2048_with_bounded_buffer(gsm8k_path, smol_tok):
    """On-the-fly best fit over a 64-row window reaches >= 98% on all of GSM8K."""
    cfg = DataConfig(
        sources=[{"path": str(gsm8k_path), "fields": {"question": "user", "answer": "assistant"}}],
        max_length=2048,
        pack_rows=64,
        prefetch=2,
    )
    loader = build_loader(cfg, smol_tok, batch_size=8, seed=0)
    batches = sum(1 for _ in loader)
    c = loader.counters
    assert c.samples == 7473 and c.rows_read == 7473 and c.dropped["overlong"] == 0
    assert batches == -(-c.rows // 8)
    assert c.packing_efficiency >= 0.98, c.as_dict()
