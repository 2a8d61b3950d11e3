"""`init_distributed`: a world of one without any environment, torchrun-style worlds, and reuse."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from posttrain.cluster import DistEnv, destroy_distributed, find_free_port, init_distributed
from posttrain.cluster.dist_env import default_backend

ROOT = Path(__file__).resolve().parents[3]
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

# Run as a separate process: join the world from the environment, all_reduce the ranks, and write
# the report to DIR/rank<N>.json (DIR = argv[1]; ranks that share one stdout can interleave lines).
RANK_SCRIPT = """
import json, pathlib, sys, torch, torch.distributed as dist
from posttrain.cluster import init_distributed, destroy_distributed
env = init_distributed()
total = torch.tensor([float(env.rank + 1)])
dist.all_reduce(total)
report = json.dumps({"rank": env.rank, "world_size": env.world_size, "local_rank": env.local_rank,
                     "device": str(env.device), "backend": env.backend, "sum": total.item(),
                     "again": init_distributed().rank})
(pathlib.Path(sys.argv[1]) / f"rank{env.rank}.json").write_text(report)
destroy_distributed()
"""


@pytest.fixture
def no_torchrun_env(monkeypatch):
    for name in TORCHRUN_VARS:
        monkeypatch.delenv(name, raising=False)
    yield
    destroy_distributed()


def test_without_environment_forms_a_world_of_one(no_torchrun_env):
    env = init_distributed()
    assert env == DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"),
                          local_world_size=1, backend="gloo")
    assert env.is_main and dist.is_initialized() and dist.get_world_size() == 1
    t = torch.tensor([2.0])
    dist.all_reduce(t)
    assert t.item() == 2.0


def test_existing_group_is_described_not_recreated(no_torchrun_env):
    first = init_distributed()
    group = dist.group.WORLD
    assert init_distributed() == first
    assert dist.group.WORLD is group


def test_destroy_is_idempotent_and_allows_a_new_world(no_torchrun_env):
    init_distributed()
    destroy_distributed()
    assert not dist.is_initialized()
    destroy_distributed()
    assert init_distributed().world_size == 1


def test_default_backend_is_gloo_on_cpu():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert default_backend() == "gloo"


def test_rank_without_master_address_is_a_clear_error(no_torchrun_env, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        init_distributed()
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "x")
    monkeypatch.setenv("RANK", "zero")
    with pytest.raises(ValueError, match="RANK='zero' is not an integer"):
        init_distributed()


def _child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.update(OMP_NUM_THREADS="1", **extra)
    return env


def _reports(report_dir: Path) -> list[dict]:
    """The rank reports written to `report_dir`, by rank."""
    return [json.loads(path.read_text()) for path in sorted(report_dir.glob("rank*.json"))]


def test_torchrun_style_environment_forms_a_two_rank_world(tmp_path):
    port = str(find_free_port("127.0.0.1"))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RANK_SCRIPT, str(tmp_path)],
            env=_child_env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                           LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        )
        for rank in range(2)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    reports = _reports(tmp_path)
    assert [r["rank"] for r in reports] == [0, 1] and [r["local_rank"] for r in reports] == [0, 1]
    assert all(r["world_size"] == 2 and r["sum"] == 3.0 and r["backend"] == "gloo" for r in reports)
    assert all(r["device"] == "cpu" and r["again"] == r["rank"] for r in reports)


def test_runs_under_torchrun_unchanged(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                "--master-addr=127.0.0.1", f"--master-port={find_free_port('127.0.0.1')}"]
    proc = subprocess.run([*torchrun, str(script), str(tmp_path)], env=_child_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    reports = _reports(tmp_path)
    assert sorted(r["rank"] for r in reports) == [0, 1]
    assert all(r["world_size"] == 2 and r["sum"] == 3.0 for r in reports)
