"""Helpers shared by the family config mappings: reading sizes and RoPE from an HF config.json."""

from __future__ import annotations

from typing import Any

from posttrain.models.common.config import FULL_ATTENTION, SLIDING_ATTENTION, ModelArgs, RopeArgs

ACTIVATION_NAMES = {
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
}
ACTIVATION_TO_HF = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}


def require(config: dict[str, Any], key: str) -> Any:
    if config.get(key) is None:
        raise ValueError(
            f"config.json has no {key!r}; it is required for "
            f"model_type {config.get('model_type')!r}"
        )
    return config[key]


def activation(config: dict[str, Any], key: str) -> str:
    name = config.get(key, "silu")
    if name not in ACTIVATION_NAMES:
        raise ValueError(
            f"unsupported activation {key}={name!r}; supported: {sorted(ACTIVATION_NAMES)}"
        )
    return ACTIVATION_NAMES[name]


def head_dim(config: dict[str, Any]) -> int:
    return config.get("head_dim") or require(config, "hidden_size") // require(
        config, "num_attention_heads"
    )


def rope_args(params: dict[str, Any] | None, default_theta: float, max_positions: int) -> RopeArgs:
    """RopeArgs from one `rope_parameters` / `rope_scaling` dict (either naming generation)."""
    params = dict(params or {})
    scaling = params.get("rope_type", params.get("type", "default"))
    theta = float(params.get("rope_theta", default_theta))
    if scaling == "default":
        return RopeArgs(theta=theta)
    if scaling == "linear":
        return RopeArgs(theta=theta, scaling="linear", factor=float(params["factor"]))
    if scaling == "llama3":
        return RopeArgs(
            theta=theta,
            scaling="llama3",
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(
                params.get("original_max_position_embeddings", max_positions)
            ),
        )
    raise ValueError(
        f"unsupported rope type {scaling!r} in config.json; supported: default, linear, llama3"
    )


def single_rope(config: dict[str, Any]) -> RopeArgs:
    """The RoPE of a family with one rotary table, from transformers 5 `rope_parameters` or the
    older `rope_theta` + `rope_scaling` fields."""
    max_positions = int(config.get("max_position_embeddings", 4096))
    theta = float(config.get("rope_theta", 10_000.0))
    params = config.get("rope_parameters") or config.get("rope_scaling")
    return rope_args(params, theta, max_positions)


def rope_to_hf(rope: RopeArgs) -> dict[str, Any]:
    """The transformers 5 `rope_parameters` entry for `rope`."""
    out: dict[str, Any] = {"rope_theta": rope.theta, "rope_type": rope.scaling}
    if rope.scaling == "linear":
        out["factor"] = rope.factor
    elif rope.scaling == "llama3":
        out.update(
            factor=rope.factor,
            low_freq_factor=rope.low_freq_factor,
            high_freq_factor=rope.high_freq_factor,
            original_max_position_embeddings=rope.original_max_position_embeddings,
        )
    return out


def windowed_layer_types(config: dict[str, Any], num_layers: int, window: int | None) -> list[str]:
    """Layer types from `layer_types` when present, else all full (or all sliding with a window)."""
    types = config.get("layer_types")
    if types:
        return list(types)
    kind = SLIDING_ATTENTION if window is not None else FULL_ATTENTION
    return [kind] * num_layers


def size_fields(args: ModelArgs, model_type: str) -> dict[str, Any]:
    """The config.json entries every family writes the same way: type, sizes, norm eps, context."""
    return {
        "model_type": model_type,
        "vocab_size": args.vocab_size,
        "hidden_size": args.hidden_size,
        "intermediate_size": args.intermediate_size,
        "num_hidden_layers": args.num_layers,
        "num_attention_heads": args.num_heads,
        "num_key_value_heads": args.num_kv_heads,
        "rms_norm_eps": args.norm_eps,
        "max_position_embeddings": args.max_position_embeddings,
    }
