"""Qwen3 `config.json` <-> `ModelArgs`."""

from __future__ import annotations

from typing import Any

from posttrain.models.common.config import ModelArgs
from posttrain.models.common.spec import ModelSpec
from posttrain.models.qwen2.spec import qwen_common, qwen_common_to_hf
from posttrain.models.qwen3.hf_adapter import KEY_MAP


def args_from_hf(config: dict[str, Any]) -> ModelArgs:
    bias = bool(config.get("attention_bias", False))
    return ModelArgs(**qwen_common(config), attention_bias=bias, output_bias=bias, qk_norm=True)


def args_to_hf(args: ModelArgs, model_type: str) -> dict[str, Any]:
    return {
        **qwen_common_to_hf(args, model_type),
        "head_dim": args.head_dim,
        "attention_bias": args.attention_bias,
    }


SPEC = ModelSpec(
    family="qwen3",
    architectures={"qwen3": "Qwen3ForCausalLM"},
    args_from_hf=args_from_hf,
    args_to_hf=args_to_hf,
    key_map=KEY_MAP,
)
