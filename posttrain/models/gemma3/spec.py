"""Gemma 3 (text) `config.json` <-> `ModelArgs`."""

from __future__ import annotations

from typing import Any

from posttrain.models.common import hf_config as hf
from posttrain.models.common.config import FULL_ATTENTION, SLIDING_ATTENTION, ModelArgs
from posttrain.models.common.spec import ModelSpec
from posttrain.models.gemma3.hf_adapter import KEY_MAP

GLOBAL_THETA, LOCAL_THETA = 1_000_000.0, 10_000.0  # transformers' defaults when absent
DEFAULT_PATTERN = 6  # every 6th layer is global when `layer_types` is absent


def _layer_types(config: dict[str, Any], num_layers: int) -> list[str]:
    if config.get("layer_types"):
        return list(config["layer_types"])
    pattern = (
        config.get("sliding_window_pattern")
        or config.get("_sliding_window_pattern")
        or DEFAULT_PATTERN
    )
    return [
        FULL_ATTENTION if (i + 1) % pattern == 0 else SLIDING_ATTENTION for i in range(num_layers)
    ]


def _ropes(config: dict[str, Any]) -> dict[str, Any]:
    """Per-layer-type RoPE from transformers 5 `rope_parameters` or the older flat fields."""
    max_positions = int(config.get("max_position_embeddings", 131_072))
    params = config.get("rope_parameters")
    if params and FULL_ATTENTION in params:
        full, local = params.get(FULL_ATTENTION), params.get(SLIDING_ATTENTION)
    else:  # older layout: rope_theta / rope_scaling for global layers, rope_local_base_freq
        full = dict(config.get("rope_scaling") or {})
        local = {}
    full_theta = float(config.get("rope_theta", GLOBAL_THETA))
    local_theta = float(config.get("rope_local_base_freq", LOCAL_THETA))
    return {
        FULL_ATTENTION: hf.rope_args(full, full_theta, max_positions),
        SLIDING_ATTENTION: hf.rope_args(local, local_theta, max_positions),
    }


def args_from_hf(config: dict[str, Any]) -> ModelArgs:
    if config.get("use_bidirectional_attention"):
        raise ValueError(
            "Gemma 3 with use_bidirectional_attention=true is not supported; set it to false"
        )
    if config.get("attn_logit_softcapping") is not None:
        raise ValueError(
            "Gemma 3 with attn_logit_softcapping is not supported (Gemma 3 checkpoints use null)"
        )
    num_layers = hf.require(config, "num_hidden_layers")
    hidden = hf.require(config, "hidden_size")
    bias = bool(config.get("attention_bias", False))
    act_key = "hidden_activation" if "hidden_activation" in config else "hidden_act"
    head_dim = config.get("head_dim") or 256
    return ModelArgs(
        vocab_size=hf.require(config, "vocab_size"),
        hidden_size=hidden,
        intermediate_size=hf.require(config, "intermediate_size"),
        num_layers=num_layers,
        num_heads=hf.require(config, "num_attention_heads"),
        num_kv_heads=config.get("num_key_value_heads") or config["num_attention_heads"],
        head_dim=head_dim,
        norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(config.get("max_position_embeddings", 131_072)),
        layer_types=_layer_types(config, num_layers),
        sliding_window=config.get("sliding_window", 4096),
        rope=_ropes(config),
        attention_bias=bias,
        output_bias=bias,
        qk_norm=True,
        sandwich_norm=True,
        norm_unit_offset=True,
        embed_scale=hidden**0.5,
        activation=hf.activation(config, act_key) if config.get(act_key) else "gelu_tanh",
        attn_scale=float(config.get("query_pre_attn_scalar", 256)) ** -0.5,
        final_logit_softcap=config.get("final_logit_softcapping"),
        tie_embeddings=bool(config.get("tie_word_embeddings", True)),
    )


def _query_pre_attn_scalar(args: ModelArgs) -> int | float:
    assert args.attn_scale is not None
    scalar = args.attn_scale**-2
    nearest = round(scalar)
    return (
        nearest if abs(scalar - nearest) < 1e-6 * max(1, nearest) else scalar
    )  # transformers wants an int


def args_to_hf(args: ModelArgs, model_type: str) -> dict[str, Any]:
    return {
        **hf.size_fields(args, model_type),
        "head_dim": args.head_dim,
        "layer_types": list(args.layer_types),
        "sliding_window": args.sliding_window,
        "rope_parameters": {kind: hf.rope_to_hf(rope) for kind, rope in args.rope.items()},
        "attention_bias": args.attention_bias,
        "hidden_activation": hf.ACTIVATION_TO_HF[args.activation],
        "query_pre_attn_scalar": _query_pre_attn_scalar(args),
        "final_logit_softcapping": args.final_logit_softcap,
        "attn_logit_softcapping": None,
        "use_bidirectional_attention": False,
        "tie_word_embeddings": args.tie_embeddings,
    }


SPEC = ModelSpec(
    family="gemma3",
    architectures={"gemma3_text": "Gemma3ForCausalLM"},
    args_from_hf=args_from_hf,
    args_to_hf=args_to_hf,
    key_map=KEY_MAP,
)
