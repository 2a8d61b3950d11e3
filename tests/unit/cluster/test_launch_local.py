"""`launch` with `backend: local`: the entry runs in this process as a world of one."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from posttrain.cluster import DistEnv
from posttrain.cluster.launch import launch
from posttrain.config.launcher import LauncherConfig


def entry(payload: dict, env: DistEnv, attempt: int) -> dict:
    t = torch.tensor([1.0])
    dist.all_reduce(t)
    return {
        "payload": payload, "rank": env.rank, "world": env.world_size, "attempt": attempt, "sum": t.item()
    }


def failing_entry(payload, env, attempt):
    raise ValueError(f"bad config {payload}")


@pytest.fixture(autouse=True)
def no_torchrun_env(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)


def test_local_backend_runs_in_process_as_world_of_one():
    result = launch(entry, {"lr": 1}, LauncherConfig())
    assert result.results == [{"payload": {"lr": 1}, "rank": 0, "world": 1, "attempt": 0, "sum": 1.0}]
    assert result.main == result.results[0] and result.restarts == 0 and result.failures == []
    assert not dist.is_initialized()  # the group it formed is gone


def test_local_backend_accepts_a_string_entrypoint():
    result = launch(f"{__name__}:entry", 7, LauncherConfig(backend="local", max_restarts=3))
    assert result.main["payload"] == 7 and result.restarts == 0


def test_local_backend_raises_the_entry_error_itself():
    with pytest.raises(ValueError, match="bad config 3"):
        launch(failing_entry, 3, LauncherConfig(max_restarts=2))
    assert not dist.is_initialized()


def test_local_launch_never_imports_ray():
    """A local run pays neither Ray's import time nor needs it: only the Ray backend imports it.
    The child inherits this process's environment, torchrun variables already removed above."""
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys\n"
        "from posttrain.cluster.launch import launch\n"
        "from posttrain.config.launcher import LauncherConfig\n"
        "assert launch('tests.unit.cluster.test_launch_local:entry', 1, LauncherConfig()).main['sum'] == 1.0\n"
        "print('ray' in sys.modules)\n"
    )
    root = Path(__file__).resolve().parents[3]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, check=True)
    assert out.stdout.strip() == "False"
