"""`ProcessEngine`: a `NativeEngine` in a process of its own, which the controller restarts if it dies.

The engine process is spawned (never forked from a process holding threads and a model), loads
the model directory in the engine's dtype, and answers requests on a private pipe. Weight
updates travel as chunks of HF-named tensors (`CHUNK_BYTES` at most per message; tensors cross
through shared memory, `torch.multiprocessing`), consumed one chunk at a time by
`NativeEngine.update_weights`, so the update stays validated and all or nothing. When the process
is gone (killed, crashed) a request raises `EngineDied`; `restart()` starts a fresh one, whose
weights are the directory's until the next `update_weights`. The child ignores SIGINT (a Ctrl-C
reaches the whole process group; the trainer decides how to stop) and dies with its parent.
"""

from __future__ import annotations

import signal
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch
import torch.multiprocessing as mp

from posttrain.cluster.child_process import ChildGone, PipedChild
from posttrain.models.sampling import SamplingParams
from posttrain.rollout.engine import RolloutBatch

CHUNK_BYTES = 64 << 20
START_TIMEOUT_S = 600
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class EngineDied(RuntimeError):
    """The engine process is gone; `restart()` it and repeat the request."""


def chunks(named: Iterable[tuple[str, torch.Tensor]]) -> Iterator[list[tuple[str, torch.Tensor]]]:
    chunk, size = [], 0
    for name, tensor in named:
        chunk.append((name, tensor.detach().cpu()))
        size += tensor.numel() * tensor.element_size()
        if size >= CHUNK_BYTES:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _received(conn) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of one update as they arrive, until its "end" message."""
    while True:
        kind, payload = conn.recv()
        if kind == "end":
            return
        yield from payload


def _serve(conn, model_dir: str, dtype: str, lm_head_fp32: bool) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from transformers import AutoTokenizer

    from posttrain.models.hf import load_hf
    from posttrain.rollout.native import NativeEngine

    engine = NativeEngine(load_hf(model_dir, dtype=DTYPES[dtype]), AutoTokenizer.from_pretrained(model_dir),
                          lm_head_fp32=lm_head_fp32)
    conn.send(("ok", (engine.pad_id, engine.policy_version)))
    while True:
        try:
            method, args = conn.recv()
        except EOFError:
            return
        try:
            if method == "update_weights":
                stream = _received(conn)
                try:
                    engine.update_weights(stream, version=args[0])
                finally:
                    for _ in stream:  # a refused update still reads the rest of its messages
                        pass
                value = None
            else:
                value = getattr(engine, method)(*args)
            conn.send(("ok", (value, engine.policy_version)))
        except Exception as err:  # noqa: BLE001 - reported to the caller, the engine stays up
            conn.send(("error", (type(err).__name__, str(err))))


class RemoteEngine:
    """The `GenerationEngine` calls that only forward to an engine elsewhere (`_call(method, *args)`
    returns the value and keeps `_version`); subclasses add start-up, `restart` and updates."""

    _version: int

    def _call(self, method: str, *args):
        raise NotImplementedError

    @property
    def policy_version(self) -> int:
        return self._version

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingParams, n: int = 1, seed: int = 0,
                 prompt_index: Sequence[int] | None = None) -> RolloutBatch:
        return self._call("generate", prompt_ids, sampling, n, seed, None if prompt_index is None else list(prompt_index))

    def sleep(self, level: int = 1) -> None:
        self._call("sleep", level)

    def wake(self) -> None:
        self._call("wake")


class ProcessEngine(RemoteEngine):
    """The `GenerationEngine` interface over a `NativeEngine` in its own process."""

    def __init__(self, model_dir: str | Path, *, dtype: str = "float32", lm_head_fp32: bool = False):
        self.child = PipedChild(_serve, (str(model_dir), dtype, lm_head_fp32), name="posttrain-engine",
                                start_timeout_s=START_TIMEOUT_S, context=mp)
        self.restarts = -1
        self.restart()

    @property
    def process(self):
        return self.child.process

    def restart(self) -> None:
        """Stop the current process (if any) and start a fresh engine from the model directory."""
        _, (self.pad_id, self._version) = self.child.start()
        self.restarts += 1

    def close(self) -> None:
        self.child.stop()

    def _send(self, message: tuple) -> None:
        try:
            self.child.send(message)
        except ChildGone as err:
            raise EngineDied(str(err)) from None

    def _answer(self):
        try:
            status, value = self.child.receive()
        except ChildGone as err:
            raise EngineDied(str(err)) from None
        if status == "error":
            kind, message = value
            raise (ValueError if kind == "ValueError" else RuntimeError)(message)
        return value

    def _call(self, method: str, *args):
        self._send((method, args))
        value, self._version = self._answer()
        return value

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int | None = None) -> None:
        self._send(("update_weights", (version,)))
        try:
            for chunk in chunks(named_tensors):
                self._send(("chunk", chunk))
        except EngineDied:
            raise
        except Exception:
            self._send(("end", None))  # the engine refuses the partial update and stays as it was
            try:
                self._answer()
            except ValueError:
                pass
            raise
        self._send(("end", None))
        _, self._version = self._answer()
