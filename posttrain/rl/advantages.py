"""Sequence advantages from the rewards of each prompt's group of `n` samples.

Every function maps `rewards [groups, n]` (float) to advantages of the same shape; the policy loss
broadcasts a sample's advantage to each of its tokens.

    grpo     (r - mean) / (std + eps), std over the group with Bessel's correction (as TRL)
    dr_grpo  r - mean: no division by the group's spread (Dr. GRPO); pair it with
             `aggregation: seq_mean_token_sum` for its "no length normalisation" half
    rloo     r - mean of the other n - 1 samples (REINFORCE leave-one-out)
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

GRPO_EPS = 1e-4  # TRL's epsilon under the group std


def grpo_advantages(rewards: Tensor) -> Tensor:
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True)
    return (rewards - mean) / (std + GRPO_EPS)


def dr_grpo_advantages(rewards: Tensor) -> Tensor:
    return rewards - rewards.mean(dim=1, keepdim=True)


def rloo_advantages(rewards: Tensor) -> Tensor:
    n = rewards.shape[1]
    others = (rewards.sum(dim=1, keepdim=True) - rewards) / (n - 1)
    return rewards - others


ADVANTAGES: dict[str, Callable[[Tensor], Tensor]] = {
    "grpo": grpo_advantages,
    "dr_grpo": dr_grpo_advantages,
    "rloo": rloo_advantages,
}


def group_advantages(name: str, rewards: Tensor) -> Tensor:
    """`ADVANTAGES[name](rewards)` for `rewards [groups, n]`, n >= 2, computed in float64."""
    if name not in ADVANTAGES:
        raise ValueError(f"unknown advantage {name!r}; available: {', '.join(sorted(ADVANTAGES))}")
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"group advantages need rewards [groups, n >= 2], got {tuple(rewards.shape)}")
    return ADVANTAGES[name](rewards.double()).to(rewards.dtype)


def constant_groups(rewards: Tensor) -> Tensor:
    """`[groups]` bool: every sample of the group got the same reward (no learning signal)."""
    return (rewards == rewards[:, :1]).all(dim=1)
