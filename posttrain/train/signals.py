"""Graceful stop: SIGTERM / SIGINT set a flag the training loop polls, so it can checkpoint and exit.

    stop = install_stop_handler()
    for step in ...:
        train_step(...)
        if stop.should_stop():        # agreed by all ranks
            save_checkpoint(...)
            break
    stop.restore()

A second signal while the first is pending restores the previous handlers and re-raises the
signal, so pressing Ctrl-C twice still interrupts a stuck run at once.

Phases that hold no state a stop must save (waiting for data, evaluating, exporting, building
the run) run inside `with stop.interruptible():`: there the first signal raises `StopRequested`
at once instead of waiting for the next step boundary, so a run ends within seconds in every
phase. A checkpoint save is never interrupted (it is what makes the stop lossless); the loop
polls the flag after it. With several ranks `interruptible` is off (a rank leaving a collective
alone would hang the others): the flag is polled at step boundaries only.
"""

from __future__ import annotations

import signal
import types
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist

Handler = Callable[[int, types.FrameType | None], Any] | int | None


class StopRequested(BaseException):
    """Raised by a stop signal inside `StopFlag.interruptible()` (a BaseException, like
    KeyboardInterrupt, so `except Exception` in library code does not swallow it)."""


class StopFlag:
    """Set by the installed handlers; `requested` is this process's view, `should_stop()` all ranks'.

    `allow_interrupt=False` makes `interruptible()` a no-op (multi-rank runs).
    """

    def __init__(self, allow_interrupt: bool = True) -> None:
        self.requested = False
        self.signum: int | None = None
        self.allow_interrupt = allow_interrupt
        self._interrupting = False
        self._previous: dict[int, Handler] = {}

    def __bool__(self) -> bool:
        return self.requested

    @property
    def signal_name(self) -> str | None:
        return signal.Signals(self.signum).name if self.signum is not None else None

    def request(self, signum: int | None = None) -> None:
        """Ask for a stop (what the handler does; also usable from code or tests)."""
        self.requested = True
        self.signum = signum

    def _handle(self, signum: int, frame: types.FrameType | None) -> None:
        if self.requested:  # second signal: give up on the graceful path
            self.restore()
            signal.raise_signal(signum)
            return
        self.request(signum)
        if self._interrupting:
            self._interrupting = False
            raise StopRequested(self.signal_name)

    @contextmanager
    def interruptible(self) -> Iterator[None]:
        """Inside, a stop signal (or one already pending) raises `StopRequested` at once."""
        if not self.allow_interrupt:
            yield
            return
        if self.requested:
            raise StopRequested(self.signal_name)
        self._interrupting = True
        try:
            yield
        finally:
            self._interrupting = False

    def should_stop(self, device: torch.device | str = "cpu") -> bool:
        """True when any rank was asked to stop (a collective when a process group exists).

        Every rank must call it at the same point of the loop. `device` holds the flag tensor for
        the all-reduce (a CUDA device with NCCL).
        """
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self.requested
        flag = torch.tensor([1 if self.requested else 0], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        """Put back the handlers that were installed before."""
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def __enter__(self) -> StopFlag:
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()


def install_stop_handler(
    signals: Iterable[signal.Signals] = (signal.SIGTERM, signal.SIGINT),
    *,
    allow_interrupt: bool = True,
) -> StopFlag:
    """Route `signals` to a new `StopFlag` (main thread only) and return it."""
    flag = StopFlag(allow_interrupt)
    for signum in signals:
        flag._previous[signum] = signal.signal(signum, flag._handle)
    return flag
