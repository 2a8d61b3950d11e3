"""Models: our decoder definitions, the Hugging Face bridge, the verifier and generation.

Public entry points (imported lazily so `import posttrain.models` stays cheap):

* `load_hf(dir, device, dtype)` / `save_hf(model, dir, tokenizer_dir)` — `posttrain.models.hf`
* `packed_attention`, `padded_attention`, `causal_attention` — attention metadata
* `posttrain.models.generate.generate(...)` — batched KV-cache sampling
* `posttrain.models.verify.verify(dir, ...)` — logit parity against transformers
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "Decoder": "posttrain.models.common.decoder",
    "ModelArgs": "posttrain.models.common.config",
    "AttentionMeta": "posttrain.models.common.attention",
    "packed_attention": "posttrain.models.common.attention",
    "padded_attention": "posttrain.models.common.attention",
    "causal_attention": "posttrain.models.common.attention",
    "load_hf": "posttrain.models.hf",
    "save_hf": "posttrain.models.hf",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'posttrain.models' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
