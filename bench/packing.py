"""Packing efficiency: our on-the-fly best fit vs TRL's offline `pack_dataset` on the same tokens.

Every sample is rendered once through SmolLM2's chat template by our renderer (GSM8K: question ->
user, answer -> assistant); both packers then see exactly the same token lists in the same order:
- ours: `BestFitPacker` as the loader runs it (on the fly, best-fit-decreasing over a 64-row window);
- TRL: `trl.data_utils.pack_dataset(..., strategy="bfd")`, offline best-fit-decreasing;
- reference: one sample per row, batches of 4 padded to their longest sample.
Efficiency = real tokens / (rows x row length). Samples longer than the row length are dropped
for all (our default `overlong: drop`). A second data set is a deliberately skewed mix: 85% short
single-turn samples (GSM8K with only the final number as the answer) and 15% long multi-turn
conversations (6-9 chained GSM8K problems, 1.2-2k tokens), drawn by our weighted mixer.

    .venv/bin/python bench/packing.py [--gsm8k ../shared/data/gsm8k_train.jsonl]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

from posttrain.config.data import DataConfig
from posttrain.data.batch import Sample
from posttrain.data.loader import Pipeline
from posttrain.data.packing import BestFitPacker

os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
ROOT = Path(__file__).resolve().parents[1]
FIELDS = {"question": "user", "answer": "assistant"}


def tokenized(cfg: DataConfig, tokenizer) -> list[list[int]]:
    """Samples in stream order, rendered by our pipeline (no packing involved)."""
    pipeline = Pipeline(cfg, tokenizer, batch_size=1)
    out: list[list[int]] = []
    drawn = []
    while (item := pipeline.mixer.next()) is not None:
        drawn.append(item)
        if len(drawn) == 256:
            out += [u[0].input_ids for u in pipeline.render_rows(drawn)]
            drawn = []
    out += [u[0].input_ids for u in pipeline.render_rows(drawn)]
    return out


def ours(seqs: list[list[int]], length: int) -> tuple[int, int, float]:
    t0 = time.perf_counter()
    packer = BestFitPacker(length, window_rows=64)
    rows = []
    for ids in seqs:
        rows += packer.add([Sample(ids, [-100] * len(ids))])
    rows += packer.flush()
    seconds = time.perf_counter() - t0
    return len(rows), sum(len(s) for r in rows for s in r), seconds


def trl(seqs: list[list[int]], length: int) -> tuple[int, int, float]:
    from datasets import Dataset
    from trl.data_utils import pack_dataset

    ds = Dataset.from_dict({"input_ids": seqs})
    t0 = time.perf_counter()
    packed = pack_dataset(ds, seq_length=length, strategy="bfd")
    seconds = time.perf_counter() - t0
    return len(packed), sum(len(x) for x in packed["input_ids"]), seconds


def pad_to_longest(seqs: list[list[int]], batch: int = 4) -> float:
    lengths = [len(s) for s in seqs]
    slots = sum(batch * max(lengths[i : i + batch]) for i in range(0, len(lengths), batch))
    return sum(lengths) / slots


def skewed_sources(gsm8k: Path, out_dir: Path, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = [json.loads(line) for line in gsm8k.open()]
    with open(out_dir / "short.jsonl", "w") as f:
        for r in rows:
            final = r["answer"].split("####")[-1].strip()
            f.write(json.dumps({"question": r["question"], "answer": final}) + "\n")
    with open(out_dir / "long.jsonl", "w") as f:
        for _ in range(len(rows) // 4):
            messages = []
            for r in rng.sample(rows, rng.randint(6, 9)):
                messages += [{"role": "user", "content": r["question"]},
                             {"role": "assistant", "content": r["answer"]}]
            f.write(json.dumps({"messages": messages}) + "\n")
    return [
        {"path": str(out_dir / "short.jsonl"), "fields": FIELDS, "weight": 0.85},
        {"path": str(out_dir / "long.jsonl"), "weight": 0.15},
    ]


def report(name: str, seqs: list[list[int]], length: int) -> str:
    kept = [s for s in seqs if len(s) <= length]
    tokens = sum(len(s) for s in kept)
    o_rows, o_tokens, o_s = ours(kept, length)
    t_rows, t_tokens, t_s = trl(kept, length)
    assert o_tokens == tokens == t_tokens, (o_tokens, tokens, t_tokens)
    lower = -(-tokens // length)
    return (
        f"| {name} | {length} | {len(kept)} ({len(seqs) - len(kept)} dropped) | {tokens} | "
        f"**{tokens / (o_rows * length):.2%}** ({o_rows} rows, {o_s:.2f} s) | "
        f"{tokens / (t_rows * length):.2%} ({t_rows} rows, {t_s:.2f} s) | "
        f"{pad_to_longest(kept):.2%} | {lower} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gsm8k", default=str(ROOT.parent / "shared" / "data" / "gsm8k_train.jsonl"))
    parser.add_argument("--model", default="smollm2-135m-instruct")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from posttrain.models.hub import import_model

    tokenizer = AutoTokenizer.from_pretrained(str(import_model(args.model)))
    t0 = time.perf_counter()
    gsm = tokenized(DataConfig(sources=[{"path": args.gsm8k, "fields": FIELDS}], shuffle=False,
                               max_length=1 << 20), tokenizer)
    print(f"rendered {len(gsm)} GSM8K samples in {time.perf_counter() - t0:.1f} s")
    with tempfile.TemporaryDirectory() as tmp:
        sources = skewed_sources(Path(args.gsm8k), Path(tmp))
        skew = tokenized(DataConfig(sources=sources, shuffle=True, seed=0, max_length=1 << 20), tokenizer)
    print(
        "| data | row length | samples | tokens | ours, on the fly | TRL pack_dataset bfd | "
        "pad-to-longest, batches of 4 | rows lower bound |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for length in (512, 1024, 2048):
        print(report("GSM8K", gsm, length), flush=True)
    print(report("skewed mix (85% short, 15% long)", skew, 2048), flush=True)

    # The loader end to end (shuffled stream, batches of 8 rows), as training sees it.
    from posttrain.data import build_loader

    cfg = DataConfig(sources=[{"path": args.gsm8k, "fields": FIELDS}], max_length=2048)
    loader = build_loader(cfg, tokenizer, batch_size=8, seed=0)
    t0 = time.perf_counter()
    batches = sum(1 for _ in loader)
    c = loader.counters
    print(
        f"loader end to end, GSM8K shuffled, 2048 x 8: {c.packing_efficiency:.2%} "
        f"({c.rows} rows, {batches} batches, {time.perf_counter() - t0:.1f} s incl. rendering)"
    )


if __name__ == "__main__":
    main()
