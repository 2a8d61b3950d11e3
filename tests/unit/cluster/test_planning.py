"""Driver-side planning without Ray running: rank order, per-rank specs, failure reports, entrypoints."""

from __future__ import annotations

import pytest

from posttrain.cluster.launch import LaunchError, RestartEvent
from posttrain.cluster.worker import NodeInfo, resolve_entrypoint
from posttrain.cluster.worker_group import (
    RankFailure,
    WorkerGroupError,
    assign_ranks,
    describe_failure,
    pick_cause,
    rank_specs,
)


def info(node: str, *gpus: str) -> NodeInfo:
    return NodeInfo(node_id=node, ip=f"10.0.0.{node[-1]}", gpu_ids=gpus, pid=1)


def test_ranks_are_grouped_by_node_then_gpu():
    infos = [info("n1", "1"), info("n2", "0"), info("n1", "0"), info("n2", "1")]
    assert assign_ranks(infos) == [2, 0, 1, 3]
    assert assign_ranks([info("n1"), info("n1")]) == [0, 1]


def test_cpu_specs_are_torchrun_style():
    specs = rank_specs([info("n1"), info("n1"), info("n2")], "10.0.0.1", 29500)
    assert [(s.rank, s.local_rank, s.local_world_size) for s in specs] == [(0, 0, 2), (1, 1, 2), (2, 0, 1)]
    assert all(s.world_size == 3 and s.master_addr == "10.0.0.1" and s.master_port == 29500 for s in specs)
    assert all(s.cuda_visible_devices == "" and s.device is None for s in specs)  # no GPU


def test_gpu_ranks_on_a_node_share_visibility_and_pick_their_own_device():
    infos = [info("n1", "2"), info("n1", "5"), info("n2", "0")]
    specs = rank_specs(infos, "10.0.0.1", 1)
    assert [s.cuda_visible_devices for s in specs] == ["2,5", "2,5", "0"]
    assert [s.device for s in specs] == ["cuda:0", "cuda:1", "cuda:0"]
    # Two GPUs per worker: a rank's device is its first GPU's place in the node's list.
    specs = rank_specs([info("n1", "0", "1"), info("n1", "2", "3")], "a", 1)
    assert [s.device for s in specs] == ["cuda:0", "cuda:2"]
    assert specs[1].cuda_visible_devices == "0,1,2,3"


def test_a_dead_rank_is_the_cause_over_its_peers_errors():
    error = RankFailure(0, "train", "error", "DistBackendError", "connection closed", "tb0")
    died = RankFailure(1, "train", "died", "ActorDiedError", "killed", "tb1")
    assert pick_cause([error, died]) is died
    other = RankFailure(3, "train", "error", "ValueError", "bad", "tb3")
    assert pick_cause([other, error]) is error
    err = WorkerGroupError([error, died])
    assert err.failure is died and "train rank 1 died: ActorDiedError: killed" in str(err)


def test_describe_failure_of_a_non_ray_exception():
    failure = describe_failure(KeyError("x"), 2, "rollout")
    assert (failure.rank, failure.role, failure.kind) == (2, "rollout", "error")
    assert failure.error_type == "KeyError"


def test_launch_error_keeps_every_attempt_and_the_last_traceback():
    failures = [
        RankFailure(1, "train", "died", "ActorDiedError", "killed", "actor died"),
        RankFailure(
            0, "train", "error", "ValueError", "bad row 7\nmore", "Traceback ...\nValueError: bad row 7"
        ),
    ]
    text = str(LaunchError(failures, max_restarts=1))
    assert "all 2 attempt(s) (launcher.max_restarts: 1)" in text
    assert "attempt 0: train rank 1 died: ActorDiedError: killed" in text
    assert "attempt 1: train rank 0 raised ValueError: bad row 7" in text
    assert text.endswith("Traceback ...\nValueError: bad row 7")
    event = RestartEvent(restart=1, max_restarts=3, failure=failures[0])
    assert event.message().endswith("restarting the train group (restart 1 of at most 3)")


def test_entrypoints_resolve_from_strings():
    assert resolve_entrypoint("os.path:join") is __import__("os").path.join
    assert resolve_entrypoint(len) is len
    for bad in ("os.path", ":join", "os.path:"):
        with pytest.raises(ValueError, match="expected 'package.module:function'"):
            resolve_entrypoint(bad)
    with pytest.raises(ValueError, match="not callable"):
        resolve_entrypoint("os:sep")


def test_remote_traceback_reads_like_python():
    from ray.exceptions import RayTaskError

    from posttrain.cluster.worker_group import remote_traceback

    rendered = (
        "\x1b[36mray::TrainWorker.run_entry()\x1b[39m (pid=7, ip=10.0.0.2)\n"
        "           ^^^^^^^^^^\n"
        '  File "recipe.py", line 3, in entry\n'
        "    raise ValueError('bad')\n"
        "    ^^^^^^^^^^^^^^^^^^^^^^^\n"
        "ValueError: bad"
    )
    err = RayTaskError("run_entry", rendered, ValueError("bad"))
    failure = describe_failure(err, 1, "train")
    assert (failure.kind, failure.error_type, failure.message) == ("error", "ValueError", "bad")
    assert remote_traceback(err, 1, "train") == failure.traceback
    assert failure.traceback.splitlines() == [
        "Traceback (most recent call last), train rank 1: ray::TrainWorker.run_entry() (pid=7, ip=10.0.0.2)",
        '  File "recipe.py", line 3, in entry',
        "    raise ValueError('bad')",
        "    ^^^^^^^^^^^^^^^^^^^^^^^",
        "ValueError: bad",
    ]
