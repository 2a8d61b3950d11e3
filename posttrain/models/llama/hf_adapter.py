"""Llama/Mistral checkpoint keys <-> ours."""

from posttrain.models.common.key_map import KeyMap, decoder_key_pairs

KEY_MAP = KeyMap(
    pairs=decoder_key_pairs(
        (("layers.{i}.ffn_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),)
    ),
    ignored_hf=(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",),
)
