"""Each advantage against values worked out by hand."""

from __future__ import annotations

import pytest
import torch

from posttrain.rl.advantages import GRPO_EPS, constant_groups, group_advantages


def test_grpo_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0]])
    # group 0: mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = 0.57735
    std = (1.0 / 3.0) ** 0.5
    expected0 = [0.5 / (std + GRPO_EPS), -0.5 / (std + GRPO_EPS), -0.5 / (std + GRPO_EPS), 0.5 / (std + GRPO_EPS)]
    out = group_advantages("grpo", rewards)
    torch.testing.assert_close(out[0], torch.tensor(expected0), rtol=1e-6, atol=0)
    assert torch.equal(out[1], torch.zeros(4))  # equal rewards: no signal, not a division by zero


def test_dr_grpo_by_hand():
    rewards = torch.tensor([[3.0, 1.0, 2.0]])
    assert torch.equal(group_advantages("dr_grpo", rewards), torch.tensor([[1.0, -1.0, 0.0]]))


def test_rloo_by_hand():
    rewards = torch.tensor([[3.0, 1.0, 2.0]])
    # 3 - (1 + 2) / 2 = 1.5; 1 - (3 + 2) / 2 = -1.5; 2 - (3 + 1) / 2 = 0
    assert torch.equal(group_advantages("rloo", rewards), torch.tensor([[1.5, -1.5, 0.0]]))


def test_constant_groups_and_bad_input():
    rewards = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    assert constant_groups(rewards).tolist() == [True, False]
    with pytest.raises(ValueError, match="unknown advantage"):
        group_advantages("ppo", rewards)
    with pytest.raises(ValueError, match="n >= 2"):
        group_advantages("grpo", torch.ones(3, 1))
