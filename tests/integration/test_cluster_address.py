"""`launcher.address: auto` attaches to a Ray head started with `ray start --head` on loopback.

The head runs in its own temp dir, as `ray start --block` in a child process: terminating that
process stops exactly this head's processes (`ray stop` would stop every Ray on the machine).
The driver runs in a subprocess so its Ray connection is independent of other test modules.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import ray
import torch
import torch.distributed as dist

from posttrain.cluster import DistEnv, find_free_port

ROOT = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))

pytestmark = pytest.mark.slow  # a second Ray cluster and a second driver: ~25-40 s here

DRIVER = """
import json
from posttrain.cluster.launch import launch
from posttrain.config.launcher import LauncherConfig
cfg = LauncherConfig(backend="ray", num_workers=2, cpus_per_worker=0.5, address="auto")
result = launch("tests.integration.test_cluster_address:report", "hello", cfg)
print(json.dumps(result.results))
"""


def report(payload: str, env: DistEnv, attempt: int) -> dict:
    t = torch.tensor([float(env.rank + 1)])
    dist.all_reduce(t)
    gcs = ray.get_runtime_context().gcs_address
    return {"rank": env.rank, "sum": t.item(), "payload": payload, "gcs": gcs, "cwd": os.getcwd()}


def _wait_for_port(port: int, head: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if head.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray head did not come up:\n{head.stdout.read() if head.stdout else ''}")
            time.sleep(0.3)


def _stop(head: subprocess.Popen, temp_dir: str) -> None:
    """Stop this head: SIGTERM to `ray start --block` ends its processes; then any stragglers
    of this temp dir (found by their command line) by pid."""
    head.terminate()
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        head.kill()
        head.wait()
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if temp_dir in " ".join(proc.info["cmdline"] or []):
            try:
                proc.kill()
            except psutil.Error:
                pass
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_head():
    port = find_free_port("127.0.0.1")
    temp_dir = tempfile.mkdtemp(prefix="ptray-", dir="/tmp")  # short: Ray's socket paths are limited
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}  # a loopback test cluster needs no token
    cmd = [RAY, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=2",
           "--include-dashboard=false", f"--temp-dir={temp_dir}", "--disable-usage-stats", "--block"]
    head = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, cwd=temp_dir)
    try:
        _wait_for_port(port, head)
        yield port
    finally:
        _stop(head, temp_dir)


def test_address_auto_attaches_to_the_running_head(ray_head):
    env = {**os.environ, "RAY_ADDRESS": f"127.0.0.1:{ray_head}", "RAY_AUTH_MODE": "disabled",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", DRIVER], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [r["rank"] for r in results] == [0, 1]
    assert all(r["sum"] == 3.0 and r["payload"] == "hello" for r in results)
    assert all(r["gcs"].endswith(f":{ray_head}") for r in results)  # this head, not a new one
    assert all(r["cwd"] == str(ROOT) for r in results)  # the driver's, not the head's directory
