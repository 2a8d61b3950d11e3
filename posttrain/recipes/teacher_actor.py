"""`teacher.placement: separate`: each student rank's teacher in a Ray actor with CPUs of its own.

    teacher = start_teacher(cfg.teacher, teacher_dir, device=..., precision=cfg.train.precision)
    with teacher.active() as model:   # a RemoteTeacherModel: hidden states come over the channel
        ...
    teacher.close()                   # the actor ends

The actor loads the teacher (`build_frozen`, whole, in its dtype, on CPU with `teacher.cpus`
threads), then serves it (`train/remote_teacher.py`) over a `TensorChannel` whose store listens on
the student rank's node. It is named `posttrain-teacher-<id>`, is never restarted by Ray, and is
owned by the rank that started it, so it ends with that rank. Only this module imports Ray for
distillation; the recipe loads it for `placement: separate` alone.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import ray
import torch

from posttrain.cluster.tensor_channel import TensorChannel
from posttrain.config.distill import TeacherConfig
from posttrain.train.remote_teacher import RemoteTeacher, TeacherGone, serve_teacher
from posttrain.train.roles import build_frozen

NAME_PREFIX = "posttrain-teacher-"
START_TIMEOUT_S = 600.0
STOP_TIMEOUT_S = 10.0


class TeacherActor:
    """Runs in the actor's process: the frozen teacher, loaded once, then served."""

    def __init__(self, role: dict[str, Any], model_dir: str, threads: int):
        torch.set_num_threads(threads)
        self.frozen = build_frozen(TeacherConfig.model_validate(role), model_dir=Path(model_dir),
                                   device=torch.device("cpu"))

    def pid(self) -> int:
        """The actor's process id (answered once the teacher has loaded)."""
        return os.getpid()

    def serve(self, address: str, precision: str, timeout_s: float) -> None:
        """Join the rank's channel at `address` and answer its requests until it says stop."""
        channel = TensorChannel.connect(address, timeout_s)
        try:
            serve_teacher(self.frozen, channel, precision)
        finally:
            channel.close()


class ActorHandle:
    """The `TeacherHandle` of a teacher actor and its running `serve` call."""

    def __init__(self, actor: Any, pid: int):
        self.actor, self.pid = actor, pid
        self.serving: ray.ObjectRef | None = None

    def failure(self) -> str:
        """Why `serve` ended, if it did ("" while it runs)."""
        if self.serving is None:
            return ""
        done, _ = ray.wait([self.serving], timeout=STOP_TIMEOUT_S)
        if not done:
            return ""
        try:
            ray.get(self.serving)
        except ray.exceptions.RayActorError as err:
            return f"the actor died ({err.__class__.__name__})"
        except ray.exceptions.RayTaskError as err:
            return f"{err.cause.__class__.__name__}: {err.cause}"
        return "it stopped serving"

    def close(self, wait: bool = False) -> None:
        """Kill the actor; with `wait`, once `serve` has returned (at most `STOP_TIMEOUT_S`)."""
        if wait and self.serving is not None:
            ray.wait([self.serving], timeout=STOP_TIMEOUT_S)
        ray.kill(self.actor, no_restart=True)


def start_teacher(role: TeacherConfig, teacher_dir: Path, *, device: torch.device, precision: str) -> RemoteTeacher:
    """Start the actor, wait for its teacher to load, connect the channel. Raises `TeacherGone`
    when the actor fails to start or to connect (its error named), `RuntimeError` when it has not
    loaded within `START_TIMEOUT_S`; the actor is killed on every failure (a stop signal too)."""
    options = {"name": NAME_PREFIX + uuid.uuid4().hex[:12], "num_cpus": role.cpus, "max_restarts": 0,
               "max_task_retries": 0, "scheduling_strategy": "DEFAULT"}  # not in the rank's placement group
    actor = ray.remote(TeacherActor).options(**options).remote(role.model_dump(mode="json"), str(teacher_dir),
                                                             max(1, int(role.cpus)))
    handle = ActorHandle(actor, pid=-1)
    try:
        handle.pid = ray.get(actor.pid.remote(), timeout=START_TIMEOUT_S)
        channel, address = TensorChannel.listen(ray.util.get_node_ip_address(), role.timeout_s)
        handle.serving = actor.serve.remote(address, precision, role.timeout_s)
        try:
            channel.join()
        except RuntimeError as err:
            raise TeacherGone(f"the teacher actor (pid {handle.pid}) did not connect: "
                              f"{handle.failure() or str(err).splitlines()[0]}") from None
        return RemoteTeacher(channel, handle, device)
    except BaseException as err:
        handle.close()
        if isinstance(err, ray.exceptions.GetTimeoutError):
            raise RuntimeError(f"the teacher actor did not load its teacher within {START_TIMEOUT_S:.0f} s "
                               f"(teacher.cpus {role.cpus}: does the cluster have them free?)") from None
        if isinstance(err, ray.exceptions.RayActorError):
            raise TeacherGone(f"the teacher actor failed to start: {err}") from None
        raise
