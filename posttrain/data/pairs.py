"""Preference pairs in the data layer: their stable ids and the check that chosen and rejected
see the same prompt tokens."""

from __future__ import annotations

import zlib
from pathlib import Path

from posttrain.config.data import SourceConfig
from posttrain.data.batch import IGNORE_INDEX, Sample

PAIR_LINE_BITS = 40  # a pair id is (source key << 40) | line: 2**40 lines per file
PAIR_SOURCE_BITS = 22  # the source key: 22 bits of a hash (ids stay positive int64)


def source_key(source: SourceConfig) -> int:
    """A stable key of a source's identity: its resolved path and split (not its position in a
    list, so a training and a held-out source never share keys unless they are the same data)."""
    identity = f"{Path(source.path).expanduser().resolve()}|{source.split or ''}"
    return zlib.crc32(identity.encode()) & ((1 << PAIR_SOURCE_BITS) - 1)


def pair_id(key: int, line: int) -> int:
    """The stable id of a preference pair: its source's key and its line (or row) in the file,
    the same in every epoch, order and world size (what a reference-log-prob cache is keyed by)."""
    if not 0 <= line < 1 << PAIR_LINE_BITS:
        raise ValueError(f"line {line} is out of range for a pair id")
    return (key << PAIR_LINE_BITS) | line


def prompt_mismatch(pair: list[Sample]) -> str | None:
    """Why chosen and rejected do not see the same prompt tokens (None when they do).

    The prompt is every token up to the first one scored, which must be identical in both, or
    the two log-probs are not comparable.
    """
    prompts = []
    for sample in pair:
        first = next((t for t, label in enumerate(sample.labels) if label != IGNORE_INDEX), None)
        if first is None:
            return None  # nothing scored: the loader drops and counts it
        prompts.append(sample.input_ids[: first + 1])
    chosen, rejected = prompts
    if chosen == rejected:
        return None
    at = next((i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b), min(len(chosen), len(rejected)))
    return (f"the prompt renders to different tokens in chosen and rejected (first difference at token {at}: "
            f"{len(chosen)} vs {len(rejected)} prompt tokens); the template or the data changes the "
            "prompt with the reply")
