"""GSM8K: the final answer is the number after `####` at the end of the response."""

from __future__ import annotations

import re

FINAL_ANSWER = re.compile(r"####\s*(-?[\d,]*\.?\d+)\s*$")


def final_answer(text: str) -> str | None:
    """The number after a trailing `#### ` (commas removed), or None when the form is absent."""
    match = FINAL_ANSWER.search(text.strip())
    if match is None:
        return None
    number = match.group(1).replace(",", "")
    if "." in number:
        number = number.rstrip("0").rstrip(".")
    return number


def score_gsm8k(response: str, reference: str) -> dict[str, float]:
    """`format`: the response ends in `#### <number>`; `correct`: that number is the reference's."""
    predicted = final_answer(response)
    expected = final_answer(reference)
    if expected is None:
        raise ValueError(f"GSM8K reference has no '#### <number>' ending: {reference[-80:]!r}")
    return {
        "format": float(predicted is not None),
        "correct": float(predicted is not None and predicted == expected),
    }
