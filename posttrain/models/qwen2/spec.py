"""Qwen2 `config.json` <-> `ModelArgs`; also the sliding-window rule Qwen2 and Qwen3 share."""

from __future__ import annotations

from typing import Any

from posttrain.models.common import hf_config as hf
from posttrain.models.common.config import FULL_ATTENTION, SLIDING_ATTENTION, ModelArgs
from posttrain.models.common.spec import ModelSpec
from posttrain.models.qwen2.hf_adapter import KEY_MAP


def qwen_window(config: dict[str, Any]) -> tuple[int | None, list[str]]:
    """Sliding window and layer types of a Qwen config.

    The window only applies with `use_sliding_window`; without `layer_types`, layers from
    `max_window_layers` on slide (the transformers default rule).
    """
    num_layers = hf.require(config, "num_hidden_layers")
    window = config.get("sliding_window") if config.get("use_sliding_window") else None
    types = config.get("layer_types")
    if not types:
        first = config.get("max_window_layers", 28)
        types = [
            SLIDING_ATTENTION if window is not None and i >= first else FULL_ATTENTION
            for i in range(num_layers)
        ]
    if window is None:  # a "sliding" layer without a window attends to everything
        types = [FULL_ATTENTION] * num_layers
    return window, list(types)


def qwen_common(config: dict[str, Any]) -> dict[str, Any]:
    """The ModelArgs fields Qwen2 and Qwen3 read the same way."""
    window, types = qwen_window(config)
    rope = hf.single_rope(config)
    return dict(
        vocab_size=hf.require(config, "vocab_size"),
        hidden_size=hf.require(config, "hidden_size"),
        intermediate_size=hf.require(config, "intermediate_size"),
        num_layers=hf.require(config, "num_hidden_layers"),
        num_heads=hf.require(config, "num_attention_heads"),
        num_kv_heads=config.get("num_key_value_heads") or config["num_attention_heads"],
        head_dim=hf.head_dim(config),
        norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(config.get("max_position_embeddings", 32768)),
        layer_types=types,
        sliding_window=window,
        rope={FULL_ATTENTION: rope, SLIDING_ATTENTION: rope},
        activation=hf.activation(config, "hidden_act"),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
    )


def qwen_common_to_hf(args: ModelArgs, model_type: str) -> dict[str, Any]:
    sliding = args.sliding_window is not None
    return {
        **hf.size_fields(args, model_type),
        "rope_parameters": hf.rope_to_hf(args.rope[FULL_ATTENTION]),
        "hidden_act": hf.ACTIVATION_TO_HF[args.activation],
        "tie_word_embeddings": args.tie_embeddings,
        "use_sliding_window": sliding,
        "sliding_window": args.sliding_window,
        "layer_types": list(args.layer_types),
    }


def args_from_hf(config: dict[str, Any]) -> ModelArgs:
    return ModelArgs(**qwen_common(config), attention_bias=True)


def args_to_hf(args: ModelArgs, model_type: str) -> dict[str, Any]:
    return qwen_common_to_hf(args, model_type)


SPEC = ModelSpec(
    family="qwen2",
    architectures={"qwen2": "Qwen2ForCausalLM"},
    args_from_hf=args_from_hf,
    args_to_hf=args_to_hf,
    key_map=KEY_MAP,
)
