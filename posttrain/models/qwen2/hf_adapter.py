"""Qwen2 checkpoint keys <-> ours (the Llama layout; q/k/v carry biases)."""

from posttrain.models.common.key_map import KeyMap, decoder_key_pairs

KEY_MAP = KeyMap(
    pairs=decoder_key_pairs(
        (("layers.{i}.ffn_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),)
    ),
)
