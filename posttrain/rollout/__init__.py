"""Rollout: the generation-engine interface RL drives, and the native KV-cache engine.

* `GenerationEngine` (Protocol), `RolloutBatch`, `SamplingParams` — `posttrain.rollout.engine`
* `NativeEngine(model, tokenizer)` — `posttrain.rollout.native`
* the trainer side of a weight sync: `posttrain.parallel.export.iter_hf_tensors_for_sync(model)`
"""

from posttrain.rollout.engine import GenerationEngine, RolloutBatch, SamplingParams
from posttrain.rollout.native import NativeEngine

__all__ = ["GenerationEngine", "NativeEngine", "RolloutBatch", "SamplingParams"]
