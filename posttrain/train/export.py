"""`export/`: the trained policy as a Hugging Face directory (and a PEFT adapter under LoRA)."""

from __future__ import annotations

from pathlib import Path

import torch.distributed as dist
import torch.nn as nn

from posttrain.config import LoraConfig
from posttrain.models.hf import save_hf
from posttrain.models.lora import merge_lora, save_peft_adapter
from posttrain.parallel.export import gather_lora_adapters, save_hf_sharded
from posttrain.parallel.load import is_distributed

WRAPPER_PREFIX = "_checkpoint_wrapped_module."


def _our_name(name: str) -> str:
    return name.replace(WRAPPER_PREFIX, "")


def export_model(lora: LoraConfig, model: nn.Module, model_dir: Path, out: Path) -> Path:
    """The merged model as an HF directory at `out`; with LoRA also `out/adapter/` (PEFT).

    A sharded model is gathered tensor by tensor: every rank calls this, rank 0 writes. A
    single-device LoRA model is merged in place (the run is over when this is called).
    """
    sharded = is_distributed(model)
    if lora.enabled:
        from posttrain.models.registry import spec_for_model_type

        spec = spec_for_model_type(model.hf_source.model_type)
        adapters = gather_lora_adapters(model) if sharded else model
        if not sharded or dist.get_rank() == 0:
            save_peft_adapter(
                adapters,
                out / "adapter",
                to_hf_name=lambda name: spec.key_map.to_hf(_our_name(name)),
                base_model_path=str(model_dir),
                rank=lora.rank,
                alpha=lora.alpha,
                dropout=lora.dropout,
            )
    if sharded:
        return save_hf_sharded(model, out, tokenizer_dir=model_dir)  # merges LoRA tensor by tensor
    if lora.enabled:
        merge_lora(model)
    save_hf(model, out, tokenizer_dir=model_dir)
    return out
