"""vLLM worker extension: in-place weight reloads from safetensors files (runs in .venv-vllm).

vLLM mixes this class into its worker (`LLM(worker_extension_cls=...)`), so its methods run in the
worker process, next to the model, when the server calls `llm.collective_rpc(name, args)`.
Tensors never travel through vLLM's RPC (a list of tensors there fails and leaves a half-loaded
model): the server writes nothing, it only passes the paths of the safetensors parts the client
wrote to shared memory, after checking every name, shape and dtype against the checkpoint.

Imports only torch and safetensors (vLLM provides `self.model_runner`).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from safetensors import safe_open


class WeightReloader:
    def posttrain_reload(self, paths: list[str], dtype: str) -> int:
        """Reload the tensors in `paths` (HF names, cast to `dtype`) in place; returns their count."""
        target = getattr(torch, dtype)
        count = 0

        def tensors() -> Iterator[tuple[str, torch.Tensor]]:
            nonlocal count
            for path in paths:
                with safe_open(path, framework="pt") as f:
                    for name in f.keys():
                        count += 1
                        yield name, f.get_tensor(name).to(target)

        self.model_runner.reload_weights(weights_iterator=tensors())
        return count
