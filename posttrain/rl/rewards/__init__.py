"""Scorers: `(response, reference) -> {metric: value}` functions, looked up by name.

The same functions score held-out generations during SFT evaluation and give verifiable rewards
in RL. Each returns floats in [0, 1]; `correct` is the headline metric of every scorer.
"""

from __future__ import annotations

from collections.abc import Callable

from posttrain.rl.rewards.addition import score_addition
from posttrain.rl.rewards.gsm8k import score_gsm8k

Scorer = Callable[[str, str], dict[str, float]]

SCORERS: dict[str, Scorer] = {
    "gsm8k": score_gsm8k,
    "addition": score_addition,
}


def get_scorer(name: str) -> Scorer:
    """A built-in scorer by name, or your own as `package.module:function` (imported, never eval'd)."""
    if ":" in name:
        import importlib

        module, _, attr = name.partition(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"scorer {name!r}: cannot import {attr!r} from {module!r} ({err})") from None
    if name not in SCORERS:
        raise ValueError(f"unknown scorer {name!r}; available: {', '.join(sorted(SCORERS))} "
                         "(or package.module:function)")
    return SCORERS[name]
