"""Built-in RL rewards, batched: `fn(prompts, completions, references, metadata, **kwargs)`.

A reward function takes four equal-length lists (prompt text, completion text, the row's reference
answer, and per-sample metadata: `num_tokens`, `finish_reason`, `max_new_tokens`) and returns one
float per sample, or one dict per sample whose `reward` key is the value used and whose other
keys are logged beside it (`correct`, `format`, ...). User functions are named `module:function`
and have the same signature.

    math      answer equivalence through math-verify (LaTeX, fractions, thousands separators);
              a reference with a GSM8K `#### answer` ending is compared on that answer
    addition  the demo task: the completion is exactly "A + B = C" with the reference's sum
    gsm8k     the completion ends in "#### <number>" equal to the reference's
    format    1 when the completion matches `pattern` (a regex, searched; `fullmatch: true` for all)
    length    a penalty in [-1, 0]: 0 up to `target` tokens, falling linearly to -1 at `limit`
              (default: the rollout's max_new_tokens), DAPO's soft overlong punishment
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from typing import Any

from posttrain.rl.rewards import score_addition, score_gsm8k

RewardFn = Callable[..., list[Any]]


def math_reward(prompts, completions, references, metadata) -> list[dict]:
    from math_verify import parse, verify

    out = []
    for completion, reference in zip(completions, references, strict=True):
        reference = str(reference)
        if "####" in reference:
            reference = reference.rsplit("####", 1)[1]
        gold, answer = parse(reference), parse(completion)
        if not gold:
            raise ValueError(f"math reward: no answer found in the reference {reference[-80:]!r}")
        correct = float(bool(answer) and verify(gold, answer))
        out.append({"reward": correct, "correct": correct, "parsed": float(bool(answer))})
    return out


def _scored(score: Callable[[str, str], dict[str, float]]) -> RewardFn:
    def reward(prompts, completions, references, metadata) -> list[dict]:
        return [{"reward": s["correct"], **s} for s in map(score, completions, map(str, references))]

    reward.__name__ = score.__name__.replace("score_", "")
    return reward


def format_reward(prompts, completions, references, metadata, *, pattern: str, fullmatch: bool = False) -> list[float]:
    regex = re.compile(pattern, re.DOTALL)
    match = regex.fullmatch if fullmatch else regex.search
    return [float(match(c.strip() if fullmatch else c) is not None) for c in completions]


def length_penalty(prompts, completions, references, metadata, *, target: int, limit: int | None = None) -> list[float]:
    out = []
    for meta in metadata:
        end = limit if limit is not None else meta["max_new_tokens"]
        if end <= target:
            raise ValueError(f"length reward: limit ({end}) must exceed target ({target})")
        over = max(0, meta["num_tokens"] - target)
        out.append(-min(1.0, over / (end - target)))
    return out


BUILTIN_REWARDS: dict[str, RewardFn] = {
    "math": math_reward,
    "addition": _scored(score_addition),
    "gsm8k": _scored(score_gsm8k),
    "format": format_reward,
    "length": length_penalty,
}


def resolve_reward(fn: str) -> RewardFn:
    """A built-in name or `package.module:function`; imports the module (no other code runs)."""
    if fn in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[fn]
    if ":" not in fn:
        raise ValueError(f"unknown reward {fn!r}: built-ins are {', '.join(sorted(BUILTIN_REWARDS))}, "
                         "or name a function as package.module:function")
    module_name, _, attr = fn.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"reward {fn!r}: cannot import {module_name!r} ({err})") from None
    function = getattr(module, attr, None)
    if not callable(function):
        raise ValueError(f"reward {fn!r}: {module_name} has no function {attr!r}")
    return function


def normalise_result(fn: str, result: Any, count: int) -> list[dict[str, float]]:
    """A reward function's return value as `count` dicts with a float `reward`; raises
    `ValueError` naming the function for a wrong length, type, missing key or non-finite value."""
    if not isinstance(result, (list, tuple)) or len(result) != count:
        got = len(result) if isinstance(result, (list, tuple)) else type(result).__name__
        raise ValueError(f"reward {fn!r} returned {got}; expected a list of {count} floats or dicts")
    rows = []
    for i, value in enumerate(result):
        row = dict(value) if isinstance(value, dict) else {"reward": value}
        if "reward" not in row:
            raise ValueError(f"reward {fn!r}: sample {i} returned a dict without a 'reward' key ({sorted(row)})")
        try:
            row = {key: float(v) for key, v in row.items()}
        except (TypeError, ValueError):
            raise ValueError(f"reward {fn!r}: sample {i} returned a non-number ({value!r})") from None
        if any(v != v or v in (float("inf"), float("-inf")) for v in row.values()):
            raise ValueError(f"reward {fn!r}: sample {i} returned a non-finite value ({value!r})")
        rows.append(row)
    return rows
