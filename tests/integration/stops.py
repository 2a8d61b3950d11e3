"""Stopping a run at a chosen point, for resume tests."""

from __future__ import annotations

import os
import signal
import time

import posttrain.train.trainer as trainer


def sigterm_after_checkpoint(monkeypatch, at_step: int) -> None:
    """The next run sends itself SIGTERM right after saving the checkpoint of `at_step`; undo with
    `monkeypatch.undo()` or by patching `trainer._checkpoint` back."""
    real = trainer._checkpoint

    def checkpoint_then_sigterm(run_state, step):
        real(run_state, step)
        if step == at_step:
            signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(trainer, "_checkpoint", checkpoint_then_sigterm)


def wait_gone(pid: int, timeout_s: float = 30.0) -> None:
    """Return once process `pid` has ended (or after `timeout_s`)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
