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
        refresh_shared_weights(self.model_runner.model)
        return count


def refresh_shared_weights(model: torch.nn.Module) -> int:
    """Re-run weight post-processing on every layer whose weight another layer shares.

    A tied LM head shares the embedding's weight, but vLLM's reload only post-processes layers it
    loaded a tensor into: on a CPU, the head's prepacked GEMM copy (`cpu_linear`) would keep the
    old weights and score every token with a stale head. Returns how many layers were refreshed.
    """
    owners: dict[int, list[torch.nn.Module]] = {}
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and getattr(module, "quant_method", None) is not None \
                and weight.numel():
            owners.setdefault(weight.data_ptr(), []).append(module)
    refreshed = 0
    for modules in owners.values():
        if len(modules) > 1:
            for module in modules:
                module.quant_method.process_weights_after_loading(module)
                refreshed += 1
    return refreshed
