"""Qwen3 checkpoint keys <-> ours (the Llama layout plus q/k norms)."""

from posttrain.models.common.key_map import KeyMap, decoder_key_pairs

KEY_MAP = KeyMap(
    pairs=decoder_key_pairs(
        (
            ("layers.{i}.ffn_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
            ("layers.{i}.attention.q_norm.weight", "model.layers.{i}.self_attn.q_norm.weight"),
            ("layers.{i}.attention.k_norm.weight", "model.layers.{i}.self_attn.k_norm.weight"),
        )
    ),
)
