"""`PipedChild`: one spawned helper process behind a private pipe, killed and replaced at will.

The reward workers and the engine process both run this way: the child is spawned (never forked
from a process holding threads and a model), sends one first message when it is ready, then
answers requests on its own end of the pipe. Nothing is shared with other children (no queue
locks), so a child that hangs or is SIGKILLed wedges nobody: the parent `stop()`s it and starts a
fresh one. A child that is gone shows up as `ChildGone` on the next send or receive.
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable
from typing import Any


class ChildGone(RuntimeError):
    """The child process died (or its pipe broke)."""


class PipedChild:
    def __init__(self, target: Callable[..., None], args: tuple = (), *, name: str, start_timeout_s: float,
                 context: Any = None):
        """`target(conn, *args)` runs in the child; `context` is a multiprocessing module or context
        (`torch.multiprocessing` to pass tensors through shared memory), spawn is always used."""
        self.target, self.args, self.name, self.start_timeout_s = target, args, name, start_timeout_s
        self.context = (context or multiprocessing).get_context("spawn")
        self.process, self.conn = None, None

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.is_alive()

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def start(self) -> Any:
        """Start the child and return its first message (its "ready" answer)."""
        self.stop()
        self.conn, child = self.context.Pipe()
        self.process = self.context.Process(target=self.target, args=(child, *self.args), daemon=True, name=self.name)
        self.process.start()
        child.close()
        try:
            return self.receive(time.monotonic() + self.start_timeout_s)
        except (ChildGone, TimeoutError) as err:
            self.stop()
            raise RuntimeError(f"the {self.name} process did not start: {err}") from None

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.join()
            self.conn.close()
        self.process, self.conn = None, None

    def send(self, message: Any) -> None:
        try:
            self.conn.send(message)
        except (BrokenPipeError, OSError):
            raise ChildGone(f"the {self.name} process (pid {self.pid}) died") from None

    def receive(self, deadline: float | None = None) -> Any:
        """The next message; `TimeoutError` when none came by `deadline` (a `time.monotonic()` value)."""
        try:
            if deadline is not None and not self.conn.poll(max(0.0, deadline - time.monotonic())):
                raise TimeoutError(f"the {self.name} process (pid {self.pid}) did not answer in time")
            return self.conn.recv()
        except (EOFError, OSError):
            raise ChildGone(f"the {self.name} process (pid {self.pid}) died") from None
