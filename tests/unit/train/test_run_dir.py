"""The run-directory lock: a live holder is named, a dead one never blocks."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from posttrain.train.run_dir import LOCK_FILE, RunDirLocked, lock_run_dir

REPO = Path(__file__).resolve().parents[3]
HOLDER = (
    "import sys, time\n"
    "from posttrain.train.run_dir import lock_run_dir\n"
    "lock = lock_run_dir(sys.argv[1])\n"
    "print('locked', flush=True)\n"
    "time.sleep(600)\n"
)


def test_a_second_lock_names_the_holder_and_release_frees_it(tmp_path):
    lock = lock_run_dir(tmp_path / "run")
    record = json.loads((tmp_path / "run" / LOCK_FILE).read_text())
    assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
    with pytest.raises(RunDirLocked, match=rf"in use by PID {os.getpid()} on host {socket.gethostname()}"):
        lock_run_dir(tmp_path / "run")
    lock.release()
    lock_run_dir(tmp_path / "run").release()


def test_a_killed_holder_never_blocks(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], cwd=REPO, stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirLocked, match=f"PID {holder.pid} on host"):
            lock_run_dir(run)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert json.loads((run / LOCK_FILE).read_text())["pid"] == holder.pid  # the stale file stays
    with lock_run_dir(run):  # and does not block
        assert json.loads((run / LOCK_FILE).read_text())["pid"] == os.getpid()


def test_a_garbage_lock_file_does_not_block(tmp_path):
    (tmp_path / LOCK_FILE).write_text("not json")
    with lock_run_dir(tmp_path):
        pass


def test_a_restart_waits_for_the_killed_holder(tmp_path):
    """A restarted worker group's rank 0 may start before the old one is gone (Ray kills
    asynchronously): with `wait_s` it takes the lock once the holder exits."""
    import threading

    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert holder.stdout.readline().strip() == "locked"
    killer = threading.Timer(1.0, holder.send_signal, args=(signal.SIGKILL,))
    killer.start()
    try:
        with lock_run_dir(tmp_path, wait_s=60):
            assert holder.poll() is not None
    finally:
        killer.cancel()
        holder.kill()
        holder.wait()
