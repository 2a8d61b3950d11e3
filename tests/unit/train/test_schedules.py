"""Warmup + cosine / linear / constant schedules: hand-computed values and resumable state."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.config.train import TrainConfig
from posttrain.train.schedules import WarmupDecayLR, build_scheduler, lr_factor

# warmup 4, total 12, min ratio 0.1: warmup ramps (s+1)/4, decay progress p = (s-4)/8.
COSINE = {
    0: 0.25,
    1: 0.5,
    3: 1.0,  # last warmup step at the peak
    4: 1.0,  # first decay step, p = 0
    8: 0.1 + 0.9 * 0.5,  # p = 1/2, cos(pi/2) = 0
    11: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 7 / 8)),
    12: 0.1,  # p = 1
    20: 0.1,  # past the end: held at the minimum
}
LINEAR = {0: 0.25, 4: 1.0, 8: 0.55, 10: 0.1 + 0.9 * 0.25, 12: 0.1, 15: 0.1}
CONSTANT = {0: 0.25, 3: 1.0, 4: 1.0, 11: 1.0, 30: 1.0}


@pytest.mark.parametrize("schedule, table", [("cosine", COSINE), ("linear", LINEAR), ("constant", CONSTANT)])
def test_factor_values(schedule, table):
    for step, expected in table.items():
        got = lr_factor(step, warmup_steps=4, total_steps=12, schedule=schedule, min_lr_ratio=0.1)
        assert got == pytest.approx(expected, abs=1e-12), (schedule, step)


def test_no_warmup_starts_at_peak_and_cosine_reaches_zero():
    assert lr_factor(0, warmup_steps=0, total_steps=10, schedule="cosine") == 1.0
    assert lr_factor(5, warmup_steps=0, total_steps=10, schedule="cosine") == pytest.approx(0.5)
    assert lr_factor(10, warmup_steps=0, total_steps=10, schedule="cosine") == pytest.approx(0.0)
    # warmup over the whole run: the ramp, then hold at the minimum
    assert lr_factor(9, warmup_steps=10, total_steps=10, schedule="linear") == 1.0


def _optimizer(lr: float = 1e-3) -> torch.optim.Optimizer:
    return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=lr)


def test_scheduler_drives_optimizer_lr_per_step():
    opt = _optimizer(2e-3)
    sched = WarmupDecayLR(opt, warmup_steps=4, total_steps=12, schedule="cosine", min_lr_ratio=0.1)
    seen = []
    for _ in range(13):
        seen.append(opt.param_groups[0]["lr"])  # the rate this optimiser step uses
        opt.step()
        sched.step()
    for step, expected in COSINE.items():
        if step < len(seen):
            assert seen[step] == pytest.approx(2e-3 * expected, rel=1e-12)


def test_state_dict_resumes_the_same_sequence():
    opt = _optimizer()
    sched = WarmupDecayLR(opt, warmup_steps=3, total_steps=20, schedule="linear", min_lr_ratio=0.2)
    for _ in range(7):
        opt.step()
        sched.step()
    state = sched.state_dict()
    saved_lr = opt.param_groups[0]["lr"]
    expected = []
    for _ in range(5):
        opt.step()
        sched.step()
        expected.append(sched.get_last_lr()[0])

    opt2 = _optimizer()
    sched2 = WarmupDecayLR(opt2, warmup_steps=3, total_steps=20, schedule="linear", min_lr_ratio=0.2)
    opt2.param_groups[0]["lr"] = 123.0  # what loading an optimiser state may leave: replaced
    sched2.load_state_dict(state)
    assert opt2.param_groups[0]["lr"] == saved_lr  # bit for bit
    got = []
    for _ in range(5):
        opt2.step()
        sched2.step()
        got.append(sched2.get_last_lr()[0])
    assert got == expected


def test_loading_keeps_the_current_settings_and_continues_at_the_saved_step():
    """A resumed run with other settings (longer, another lr or shape) follows its own schedule
    from the saved step, not the saved settings (which would give lr 0 past the old end)."""
    opt = _optimizer(1e-3)
    sched = WarmupDecayLR(opt, warmup_steps=0, total_steps=6, schedule="cosine")
    for _ in range(6):
        opt.step()
        sched.step()
    assert sched.get_last_lr()[0] == 0.0  # the old run ended at the bottom of its cosine
    opt2 = _optimizer(5e-3)
    sched2 = WarmupDecayLR(opt2, warmup_steps=0, total_steps=8, schedule="cosine")
    sched2.load_state_dict(sched.state_dict())
    expected = 5e-3 * lr_factor(6, warmup_steps=0, total_steps=8, schedule="cosine")
    assert expected > 0
    assert opt2.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-12)
    assert opt2.param_groups[0]["initial_lr"] == 5e-3
    assert (sched2.total_steps, sched2.last_epoch) == (8, 6)


def test_build_scheduler_from_config():
    cfg = TrainConfig(steps=10, warmup_steps=2, schedule="constant", lr=1e-3)
    opt = _optimizer(cfg.lr)
    sched = build_scheduler(opt, cfg, total_steps=10)
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-4)
    with pytest.raises(ValueError, match="warmup_steps"):
        build_scheduler(_optimizer(), cfg, total_steps=1)
    assert sched.total_steps == 10
