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
