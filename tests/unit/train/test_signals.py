"""Graceful-stop handler: the first signal sets the flag, a second one interrupts."""

from __future__ import annotations

import os
import signal

import pytest

from posttrain.train.signals import install_stop_handler


def test_sigterm_sets_flag_and_restore_puts_back_handlers():
    before = signal.getsignal(signal.SIGTERM)
    with install_stop_handler() as stop:
        assert not stop and not stop.should_stop()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.should_stop()
        assert stop.signal_name == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is before


def test_second_sigint_interrupts():
    stop = install_stop_handler([signal.SIGINT])
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signal_name == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        stop.restore()


def test_request_from_code():
    stop = install_stop_handler([])
    stop.request()
    assert stop.should_stop() and stop.signum is None


def test_a_signal_inside_an_interruptible_phase_raises_at_once():
    import time

    from posttrain.train.signals import StopRequested

    with install_stop_handler([signal.SIGTERM]) as stop:
        started = time.monotonic()
        with pytest.raises(StopRequested, match="SIGTERM"):
            with stop.interruptible():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(30)  # a phase that would not reach a step boundary soon
        assert time.monotonic() - started < 5 and stop.requested
        with pytest.raises(StopRequested):  # a pending stop ends the next phase before it starts
            with stop.interruptible():
                raise AssertionError("must not run")


def test_outside_a_phase_or_without_interrupts_the_signal_only_sets_the_flag():
    with install_stop_handler([signal.SIGTERM], allow_interrupt=False) as stop:
        with stop.interruptible():
            os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested
    with install_stop_handler([signal.SIGTERM]) as stop:
        with stop.interruptible():
            pass
        os.kill(os.getpid(), signal.SIGTERM)  # e.g. during a checkpoint save: finishes it
        assert stop.requested
