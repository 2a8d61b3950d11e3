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


def kill_engine_on_second_call(prompts, completions, references, metadata, constant=False, on_call=2):
    """The second (`on_call`-th) scoring SIGKILLs the engine process (the controller runs it
    in-process); `constant`: every sample scores 1 (groups without signal, which dynamic sampling
    refills)."""
    import multiprocessing
    import os
    import signal

    count = int(os.environ.get("POSTTRAIN_TEST_ENGINE_KILLS", "0")) + 1
    os.environ["POSTTRAIN_TEST_ENGINE_KILLS"] = str(count)
    if count == on_call:
        for child in multiprocessing.active_children():
            if child.name == "posttrain-engine":
                os.kill(child.pid, signal.SIGKILL)
                child.join()
        for pid in vllm_servers():
            os.kill(pid, signal.SIGKILL)
    return [1.0 if constant else float(len(c) % 2) for c in completions]


def kill_ray_engine_on_second_call(prompts, completions, references, metadata):
    """The second rollout's scoring SIGKILLs every engine actor of this Ray cluster (its pid)."""
    import os
    import signal

    import ray

    count = int(os.environ.get("POSTTRAIN_TEST_ENGINE_KILLS", "0")) + 1
    os.environ["POSTTRAIN_TEST_ENGINE_KILLS"] = str(count)
    if count == 2:
        for actor in ray.util.list_named_actors(all_namespaces=True):
            if actor["name"].startswith("posttrain-engine-"):
                try:
                    handle = ray.get_actor(actor["name"], namespace=actor["namespace"])
                    _, _, pid = ray.get(handle.info.remote())
                except (ValueError, ray.exceptions.RayActorError):
                    continue  # an engine of an earlier run, already gone
                os.kill(pid, signal.SIGKILL)
    return [float(len(c) % 2) for c in completions]


def signal_and_go_on_second_call(prompts, completions, references, metadata, delay=3.0):
    """The second scoring (a rollout generated ahead, in its thread) waits `delay` seconds, sends
    this process SIGTERM and returns: the trainer is then waiting for that rollout."""
    import os
    import signal

    count = int(os.environ.get("POSTTRAIN_TEST_REWARD_CALLS", "0")) + 1
    os.environ["POSTTRAIN_TEST_REWARD_CALLS"] = str(count)
    if count == 2:
        time.sleep(delay)
        os.kill(os.getpid(), signal.SIGTERM)
    return [float(len(c) % 2) for c in completions]


def vllm_servers() -> list[int]:
    """Pids of this process's children that are vLLM engine servers."""
    import os
    from pathlib import Path

    me, found = os.getpid(), []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if int((entry / "stat").read_text().split(")")[1].split()[1]) != me:
                continue
            if b"posttrain_vllm_server.py" in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except (OSError, IndexError, ValueError):
            continue
    return found
