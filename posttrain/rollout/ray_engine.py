"""`RayEngine`: a `NativeEngine` in a Ray actor, which the controller restarts if it dies.

The Ray backend's counterpart of `ProcessEngine`, with the same surface (`restart`, `close`,
`EngineDied`). Placement:

    colocated  the actor runs on the calling rank's node with no CPUs reserved (it shares the
               rank's cores and runs only while the trainer waits for the rollout)
    separate   the actor reserves `cpus` CPUs of its own, wherever the cluster has them

A weight update puts chunks of HF-named tensors in the object store (one copy of the weights, on
the trainer's node, until the update ends) and passes their references in one call; the actor
fetches and applies them one chunk at a time through `NativeEngine.update_weights`, so the update
stays validated and all or nothing. The actor is named `posttrain-engine-<id>` (visible in
`ray list actors`); the controller, not Ray, restarts it (`max_restarts=0`).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import ray
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from posttrain.rollout.process_engine import DTYPES, START_TIMEOUT_S, EngineDied, RemoteEngine, chunks

NAME_PREFIX = "posttrain-engine-"
CLOSE_TIMEOUT_S = 30.0


class EngineActor:
    """Runs in the actor process: the engine and the methods the client calls."""

    def __init__(self, model_dir: str, dtype: str, lm_head_fp32: bool, threads: int, vllm: dict | None = None):
        """The native engine, or with `vllm` (VLLMEngine's keyword arguments) a vLLM server
        process started by this actor on its node."""
        from transformers import AutoTokenizer

        torch.set_num_threads(threads)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        if vllm is not None:
            from posttrain.rollout.vllm_engine import VLLMEngine

            self.engine = VLLMEngine(model_dir, tokenizer, **vllm)
            return
        from posttrain.models.hf import load_hf
        from posttrain.rollout.native import NativeEngine

        self.engine = NativeEngine(load_hf(model_dir, dtype=DTYPES[dtype]), tokenizer, lm_head_fp32=lm_head_fp32)

    def info(self) -> tuple[int, int, int]:
        """(pad id, policy version, the actor's pid)."""
        return self.engine.pad_id, self.engine.policy_version, os.getpid()

    def call(self, method: str, *args: Any) -> tuple[Any, int]:
        return getattr(self.engine, method)(*args), self.engine.policy_version

    def close(self) -> None:
        """End the engine's own processes (a vLLM server's whole process group) before the actor
        goes: Ray kills an actor's direct children with it, which would orphan the grandchildren."""
        close = getattr(self.engine, "close", None)
        if close is not None:
            close()

    def update_weights(self, refs: list[ray.ObjectRef], version: int | None) -> tuple[None, int]:
        def tensors() -> Iterator[tuple[str, torch.Tensor]]:
            for ref in refs:
                yield from ray.get(ref)

        self.engine.update_weights(tensors(), version=version)
        return None, self.engine.policy_version


def actor_options(placement: str, cpus: float) -> dict[str, Any]:
    """Ray options of the engine actor for `placement` (see the module doc)."""
    options: dict[str, Any] = {"name": NAME_PREFIX + uuid.uuid4().hex[:12], "max_restarts": 0,
                               "max_task_retries": 0}
    if placement == "colocated":
        node = ray.get_runtime_context().get_node_id()
        return {**options, "num_cpus": 0, "scheduling_strategy": NodeAffinitySchedulingStrategy(node, soft=False)}
    return {**options, "num_cpus": cpus, "scheduling_strategy": "DEFAULT"}


class RayEngine(RemoteEngine):
    """The `GenerationEngine` interface over a `NativeEngine` in a Ray actor, or with `vllm`
    (`VLLMEngine`'s keyword arguments) over a vLLM server the actor starts on its node; a vLLM
    server that dies is reported as `EngineDied`, like the actor itself."""

    def __init__(self, model_dir: str | Path, *, dtype: str = "float32", lm_head_fp32: bool = False,
                 placement: str = "colocated", cpus: float = 1.0, vllm: dict | None = None):
        threads = torch.get_num_threads() if placement == "colocated" else max(1, int(cpus))
        self._args = (str(model_dir), dtype, lm_head_fp32, threads, vllm)
        self.placement, self.cpus = placement, cpus
        self.actor, self.pid = None, None
        self.restarts = -1
        self.restart()

    def restart(self) -> None:
        """Kill the current actor (if any) and start a fresh engine from the model directory."""
        self.close()
        self.actor = ray.remote(EngineActor).options(**actor_options(self.placement, self.cpus)).remote(*self._args)
        try:
            self.pad_id, self._version, self.pid = self._get(self.actor.info.remote(), timeout=START_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            self.close()
            raise RuntimeError(f"the engine actor did not start within {START_TIMEOUT_S} s (placement "
                               f"{self.placement}, rollout.cpus {self.cpus}: does the cluster have them free?)") from None
        self.restarts += 1

    def close(self) -> None:
        """Ask the actor to end its engine's processes (up to `CLOSE_TIMEOUT_S`), then kill it."""
        if self.actor is not None:
            try:
                ray.get(self.actor.close.remote(), timeout=CLOSE_TIMEOUT_S)
            except ray.exceptions.RayError:
                pass  # dead or stuck: killed below
            ray.kill(self.actor, no_restart=True)
        self.actor = None

    def _get(self, ref: ray.ObjectRef, timeout: float | None = None) -> Any:
        try:
            return ray.get(ref, timeout=timeout)
        except ray.exceptions.RayActorError as err:
            raise EngineDied(f"the engine actor (pid {self.pid}) died: {err.__class__.__name__}") from None
        except ray.exceptions.RayTaskError as err:
            cause = err.cause
            if isinstance(cause, EngineDied):  # the vLLM server behind the actor
                raise EngineDied(str(cause)) from None
            raise (ValueError if isinstance(cause, ValueError) else RuntimeError)(str(cause)) from None

    def _call(self, method: str, *args: Any) -> Any:
        value, self._version = self._get(self.actor.call.remote(method, *args))
        return value

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int | None = None) -> None:
        refs = [ray.put(chunk) for chunk in chunks(named_tensors)]
        try:
            _, self._version = self._get(self.actor.update_weights.remote(refs, version))
        finally:
            del refs  # the object store's copy goes with the last reference
