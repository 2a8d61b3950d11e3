"""The demo task: "A + B = C" answers to two-number addition questions."""

from __future__ import annotations

import re

ANSWER = re.compile(r"^\s*(\d+)\s*\+\s*(\d+)\s*=\s*(\d+)\s*\.?\s*$")


def score_addition(response: str, reference: str) -> dict[str, float]:
    """`format`: the response is exactly `A + B = C`; `correct`: it equals the reference's sum."""
    got = ANSWER.match(response)
    want = ANSWER.match(reference)
    if want is None:
        raise ValueError(f"addition reference is not of the form 'A + B = C': {reference!r}")
    return {
        "format": float(got is not None),
        "correct": float(got is not None and got.groups() == want.groups()),
    }
