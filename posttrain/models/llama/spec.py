"""Llama/Mistral `config.json` <-> `ModelArgs`."""

from __future__ import annotations

from typing import Any

from posttrain.models.common import hf_config as hf
from posttrain.models.common.config import FULL_ATTENTION, SLIDING_ATTENTION, ModelArgs
from posttrain.models.common.spec import ModelSpec
from posttrain.models.llama.hf_adapter import KEY_MAP

MISTRAL_DEFAULT_WINDOW = 4096  # transformers' MistralConfig default when the key is absent


def args_from_hf(config: dict[str, Any]) -> ModelArgs:
    num_layers = hf.require(config, "num_hidden_layers")
    window = None
    if config.get("model_type") == "mistral":
        window = config.get("sliding_window", MISTRAL_DEFAULT_WINDOW)
    kind = SLIDING_ATTENTION if window is not None else FULL_ATTENTION
    bias = bool(config.get("attention_bias", False))
    return ModelArgs(
        vocab_size=hf.require(config, "vocab_size"),
        hidden_size=hf.require(config, "hidden_size"),
        intermediate_size=hf.require(config, "intermediate_size"),
        num_layers=num_layers,
        num_heads=hf.require(config, "num_attention_heads"),
        num_kv_heads=config.get("num_key_value_heads") or config["num_attention_heads"],
        head_dim=hf.head_dim(config),
        norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(config.get("max_position_embeddings", 4096)),
        layer_types=[kind] * num_layers,
        sliding_window=window,
        rope={kind: hf.single_rope(config)},
        attention_bias=bias,
        output_bias=bias,
        mlp_bias=bool(config.get("mlp_bias", False)),
        activation=hf.activation(config, "hidden_act"),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
    )


def args_to_hf(args: ModelArgs, model_type: str) -> dict[str, Any]:
    out: dict[str, Any] = {
        **hf.size_fields(args, model_type),
        "head_dim": args.head_dim,
        "rope_parameters": hf.rope_to_hf(next(iter(args.rope.values()))),
        "attention_bias": args.attention_bias,
        "hidden_act": hf.ACTIVATION_TO_HF[args.activation],
        "tie_word_embeddings": args.tie_embeddings,
    }
    if model_type == "mistral":
        out["sliding_window"] = args.sliding_window
    else:
        out["mlp_bias"] = args.mlp_bias
    return out


SPEC = ModelSpec(
    family="llama",
    architectures={"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"},
    args_from_hf=args_from_hf,
    args_to_hf=args_to_hf,
    key_map=KEY_MAP,
)
