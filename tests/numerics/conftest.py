"""Variant tiny checkpoints for features the base tiny families leave off."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny_models import build_checkpoint_from_config, tiny_config

VARIANTS = ("llama3_rope", "mistral_window", "qwen2_window", "gemma3_softcap_linear_rope")


def variant_config(name: str):
    import transformers as tf

    if name == "llama3_rope":
        config = tiny_config("llama", vocab_size=0)
        config.rope_parameters = {
            "rope_type": "llama3",
            "rope_theta": 10_000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
        return config
    if name == "mistral_window":
        return tf.MistralConfig(
            vocab_size=0,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            sliding_window=8,
            tie_word_embeddings=False,
        )
    if name == "qwen2_window":
        return tf.Qwen2Config(
            vocab_size=0,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            use_sliding_window=True,
            sliding_window=8,
            max_window_layers=1,
        )
    if name == "gemma3_softcap_linear_rope":
        config = tiny_config("gemma3", vocab_size=0)
        config.final_logit_softcapping = 3.0
        config.rope_parameters = {
            "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        }
        return config
    raise ValueError(name)


@pytest.fixture(scope="session")
def variant_checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("variant_models")
    return {
        name: build_checkpoint_from_config(variant_config(name), root / name) for name in VARIANTS
    }
