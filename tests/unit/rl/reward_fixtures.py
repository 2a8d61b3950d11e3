"""Reward functions for the worker tests, importable by spawned worker processes."""

from __future__ import annotations

import time


def fails_on_seven(prompts, completions, references, metadata):
    """1.0 per sample, but raises when any completion contains a 7."""
    if any("7" in c for c in completions):
        raise RuntimeError("cannot score a seven")
    return [1.0 for _ in completions]


def hangs_on_seven(prompts, completions, references, metadata):
    if any("7" in c for c in completions):
        time.sleep(60)
    return [{"reward": 1.0, "seen": float(len(c))} for c in completions]


def wrong_length(prompts, completions, references, metadata):
    return [1.0]


def not_finite(prompts, completions, references, metadata):
    return [float("nan") for _ in completions]


def parity(prompts, completions, references, metadata):
    """Constant 1.0 for prompts mentioning 'same', else the completion length's parity."""
    return [1.0 if "same" in p else float(len(c) % 2) for p, c in zip(prompts, completions)]


def signal_on_second_call(prompts, completions, references, metadata):
    """The second rollout's scoring sends this process SIGTERM and stalls (a stop while rewards run)."""
    import os
    import signal

    count = int(os.environ.get("POSTTRAIN_TEST_REWARD_CALLS", "0")) + 1
    os.environ["POSTTRAIN_TEST_REWARD_CALLS"] = str(count)
    if count == 2:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(300)
    return [float(len(c) % 2) for c in completions]


def kill_engine_on_second_call(prompts, completions, references, metadata):
    """The second rollout's scoring SIGKILLs the engine process (the controller runs it in-process)."""
    import multiprocessing
    import os
    import signal

    count = int(os.environ.get("POSTTRAIN_TEST_ENGINE_KILLS", "0")) + 1
    os.environ["POSTTRAIN_TEST_ENGINE_KILLS"] = str(count)
    if count == 2:
        for child in multiprocessing.active_children():
            if child.name == "posttrain-engine":
                os.kill(child.pid, signal.SIGKILL)
                child.join()
    return [float(len(c) % 2) for c in completions]
