"""Ray worker groups and fault-tolerant launch on one local Ray instance shared by the module.

Two workers of 0.5 CPU each (plus a third for the two-group test) fit the 2-CPU instance.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import ray
import torch
import torch.distributed as dist

from posttrain.cluster import DistEnv, Worker
from posttrain.cluster.launch import LaunchError, RestartEvent, launch
from posttrain.cluster.worker_group import WorkerGroup, WorkerGroupError
from posttrain.config.launcher import LauncherConfig


def two_workers(**overrides) -> LauncherConfig:
    return LauncherConfig(backend="ray", num_workers=2, cpus_per_worker=0.5, **overrides)


# -- functions the workers run (importable as tests.integration.test_cluster_ray:<name>) -----


def rank_sum() -> dict:
    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    return {"rank": dist.get_rank(), "sum": t.item(), "pid": os.getpid()}


def signal_handlers_work() -> bool:
    """Actor methods run on the main thread, so a recipe can install its stop handler."""
    previous = signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, previous)
    return threading.current_thread() is threading.main_thread()


def sharded_sum(values: list[float]) -> float:
    t = torch.tensor([sum(values)])
    dist.all_reduce(t)
    return t.item()


def weights_of_rank() -> torch.Tensor:
    return torch.full((3,), float(dist.get_rank() + 1))


class Reader(Worker):
    """A second role (stands in for rollout): no process group, a coarse method over tensors."""

    role = "reader"

    def total(self, *tensors: torch.Tensor) -> float:
        return float(sum(t.sum() for t in tensors))


def kill_rank1_on_first_attempt(payload: dict, env: DistEnv, attempt: int) -> dict:
    dist.barrier()
    if attempt == 0 and env.rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    t = torch.tensor([float(env.rank + 1)])
    dist.all_reduce(t)
    return {"rank": env.rank, "attempt": attempt, "sum": t.item(), "steps": payload["steps"]}


def rank1_raises(payload: None, env: DistEnv, attempt: int) -> None:
    if env.rank == 1:
        raise ValueError(f"row 7 of train.jsonl is bad (attempt {attempt})")
    dist.barrier()  # rank 0 blocks on its peer: the driver must not wait for it


# -- tests -------------------------------------------------------------------------------


def test_two_workers_form_a_gloo_world(ray_instance):
    with WorkerGroup(two_workers()) as group:
        assert [(e.rank, e.world_size, e.local_rank, e.local_world_size) for e in group.envs] == [
            (0, 2, 0, 2),
            (1, 2, 1, 2),
        ]
        assert all(e.backend == "gloo" and e.device == torch.device("cpu") for e in group.envs)

        results = group.run(rank_sum)
        assert [r["rank"] for r in results] == [0, 1] and all(r["sum"] == 3.0 for r in results)
        assert results[0]["pid"] != results[1]["pid"] != os.getpid()

        assert group.run(f"{__name__}:signal_handlers_work") == [True, True]
        halves = [([1.0, 2.0],), ([3.0],)]
        assert group.call_per_rank("run", [(sharded_sum, args) for args in halves]) == [6.0, 6.0]


def test_object_refs_move_between_groups_without_the_driver(ray_instance):
    with WorkerGroup(two_workers()) as train:
        refs = train.call_async("run", weights_of_rank)
        reader_cfg = LauncherConfig(backend="ray", num_workers=1, cpus_per_worker=0.5)
        with WorkerGroup(reader_cfg, Reader, form_process_group=False) as reader:
            assert reader.envs == [None]
            assert reader.call("total", *refs) == [9.0]  # (1+2) * 3 elements


def test_killed_rank_restarts_the_group(ray_instance):
    events: list[RestartEvent] = []
    result = launch(
        kill_rank1_on_first_attempt, {"steps": 5}, two_workers(max_restarts=2), on_restart=events.append
    )
    assert result.restarts == 1
    assert result.results == [
        {"rank": 0, "attempt": 1, "sum": 3.0, "steps": 5},
        {"rank": 1, "attempt": 1, "sum": 3.0, "steps": 5},
    ]
    assert [(f.rank, f.kind) for f in result.failures] == [(1, "died")]
    assert len(events) == 1 and events[0].restart == 1 and events[0].failure.rank == 1


def test_deterministic_error_exhausts_restarts_with_its_traceback(ray_instance):
    start = time.monotonic()
    with pytest.raises(LaunchError) as info:
        launch(rank1_raises, None, two_workers(max_restarts=1))
    text = str(info.value)
    assert "row 7 of train.jsonl is bad (attempt 1)" in text
    assert "Traceback" in text and "rank1_raises" in text  # the remote traceback itself
    assert [(f.rank, f.error_type) for f in info.value.failures] == [(1, "ValueError")] * 2
    assert isinstance(info.value.__cause__, WorkerGroupError)
    # Rank 0 hangs in a barrier that would only end at the 30-minute default collective timeout;
    # finishing well inside it shows the driver did not wait for it (the bound leaves room for a
    # loaded 2-core machine, where two group starts alone can take minutes).
    assert time.monotonic() - start < 900


def test_group_that_cannot_fit_times_out_and_frees_its_reservation(ray_instance):
    with pytest.raises(TimeoutError, match="could not fit 2 train workers"):
        WorkerGroup(LauncherConfig(backend="ray", num_workers=2, cpus_per_worker=2, placement_timeout_s=1))
    # Nothing is held any more, by this group or by the groups of the tests before it.
    deadline = time.monotonic() + 30
    while ray.available_resources().get("CPU") != ray.cluster_resources()["CPU"]:
        assert time.monotonic() < deadline, ray.available_resources()
        time.sleep(0.2)
