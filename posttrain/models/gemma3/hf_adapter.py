"""Gemma 3 checkpoint keys <-> ours.

Gemma's `post_attention_layernorm` normalises the attention *output* (our `post_attention_norm`);
the norm before the MLP is `pre_feedforward_layernorm` (our `ffn_norm`).
"""

from posttrain.models.common.key_map import KeyMap, decoder_key_pairs

KEY_MAP = KeyMap(
    pairs=decoder_key_pairs(
        (
            (
                "layers.{i}.post_attention_norm.weight",
                "model.layers.{i}.post_attention_layernorm.weight",
            ),
            ("layers.{i}.ffn_norm.weight", "model.layers.{i}.pre_feedforward_layernorm.weight"),
            (
                "layers.{i}.post_ffn_norm.weight",
                "model.layers.{i}.post_feedforward_layernorm.weight",
            ),
            ("layers.{i}.attention.q_norm.weight", "model.layers.{i}.self_attn.q_norm.weight"),
            ("layers.{i}.attention.k_norm.weight", "model.layers.{i}.self_attn.k_norm.weight"),
        )
    ),
)
