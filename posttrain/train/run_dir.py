"""One run at a time per run directory: an exclusive lock held for the run's lifetime.

`lock_run_dir` takes `flock(LOCK_EX | LOCK_NB)` on `<run_dir>/.lock` and writes the holder's PID,
host and start time into it. The kernel releases the lock when the process ends however it ends
(SIGKILL included), so a lock file left by a dead run never blocks; a second live run with the
same `output_dir` + `name` gets `RunDirLocked` naming the holder. Only rank 0 holds it (ranks of one
run share the directory); `flock` works across hosts on NFSv4 and most cluster filesystems.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from posttrain.cluster.dist_env import DistEnv

LOCK_FILE = ".lock"


class RunDirLocked(ValueError):
    """Another live process holds the run directory."""


@dataclass
class RunLock:
    path: Path
    fd: int | None

    def release(self) -> None:
        """Unlock (the file stays: deleting a lock file races with a process opening it)."""
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_run_dir(run_dir: str | Path, wait_s: float = 0.0) -> RunLock:
    """Lock `run_dir` (created if needed) for this process, or raise `RunDirLocked`.

    `wait_s` retries that long first: a restarted worker group waits for the killed previous
    group's processes to be gone.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by child processes
    deadline = time.monotonic() + wait_s
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.1)
    except BlockingIOError:
        holder = _describe_holder(fd)
        os.close(fd)
        raise RunDirLocked(
            f"run directory {run_dir} is in use by {holder}: another run with the same output_dir "
            "and name is training. Wait for it to end, stop it, or choose another name"
        ) from None
    except BaseException:
        os.close(fd)
        raise
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
    return RunLock(path, fd)


def _describe_holder(fd: int) -> str:
    try:
        holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"PID {holder['pid']} on host {holder['host']} (since {holder.get('started', '?')})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (its PID and host were not recorded yet)"


RESTART_WAIT_S = 60.0


def hold_run_dir(run_dir: str | Path, env: DistEnv, attempt: int = 0) -> RunLock | None:
    """Rank 0 locks `run_dir`; every rank raises `RunDirLocked` when it could not (collective).

    A restart (`attempt > 0`) waits up to `RESTART_WAIT_S` for the previous group's rank 0,
    which the launcher kills asynchronously, to release it."""
    lock, error = None, None
    if env.is_main:
        try:
            lock = lock_run_dir(run_dir, wait_s=RESTART_WAIT_S if attempt > 0 else 0.0)
        except RunDirLocked as err:
            error = err
    if env.world_size > 1:
        failed = torch.tensor([int(error is not None)], dtype=torch.int32, device=env.device)
        dist.all_reduce(failed, op=dist.ReduceOp.MAX)
        if failed.item() and error is None:
            raise RunDirLocked(f"rank 0 could not lock the run directory {run_dir} (another run holds it)")
    if error is not None:
        raise error
    return lock
