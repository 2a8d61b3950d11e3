"""The demo's own task: two-number addition answered in one fixed form, generated in code.

The bundled SmolLM2 answers "What is 47 plus 38?" with a paragraph; after a short SFT it answers
"47 + 38 = 85". Held-out prompts use number pairs never seen in training, so the before/after
metric (exact answers) measures what the model learnt, not what it memorised.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

QUESTION_FORMS = (
    "What is {a} plus {b}?",
    "What is {a} + {b}?",
    "Add {a} and {b}.",
    "Compute {a} + {b}.",
    "What do you get when you add {a} to {b}?",
    "Please calculate the sum of {a} and {b}.",
)
ANSWER_FORM = "{a} + {b} = {c}"


def _pairs(seed: int, count: int, exclude: set[tuple[int, int]]) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    pairs: list[tuple[int, int]] = []
    seen = set(exclude)
    while len(pairs) < count:
        pair = (rng.randint(10, 99), rng.randint(10, 99))
        if pair not in seen:
            seen.add(pair)
            pairs.append(pair)
    return pairs


def make_rows(seed: int, count: int, exclude: set[tuple[int, int]] = frozenset()) -> list[dict]:
    """`count` rows `{question, answer}` with distinct number pairs not in `exclude`."""
    rng = random.Random(seed + 1)
    rows = []
    for a, b in _pairs(seed, count, exclude):
        question = rng.choice(QUESTION_FORMS).format(a=a, b=b)
        rows.append({"question": question, "answer": ANSWER_FORM.format(a=a, b=b, c=a + b)})
    return rows


def write_task(out_dir: str | Path, *, train: int = 600, held_out: int = 24, seed: int = 0) -> tuple[Path, Path]:
    """Write `train.jsonl` and `held_out.jsonl` (disjoint number pairs) and return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    held_pairs = set(_pairs(seed + 1000, held_out, set()))
    held_rows = make_rows(seed + 1000, held_out)
    train_rows = make_rows(seed, train, exclude=held_pairs)
    paths = []
    for name, rows in (("train.jsonl", train_rows), ("held_out.jsonl", held_rows)):
        path = out / name
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths.append(path)
    return paths[0], paths[1]

