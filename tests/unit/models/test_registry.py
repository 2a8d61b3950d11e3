import json

import pytest

from posttrain.models.hf import load_hf, read_hf_config
from posttrain.models.registry import FAMILIES, get_spec, spec_for_model_type, supported_model_types


def test_every_family_has_a_spec():
    assert set(FAMILIES) == {"llama", "qwen2", "qwen3", "gemma3"}
    for model_type in ("llama", "mistral", "qwen2", "qwen3", "gemma3_text"):
        assert spec_for_model_type(model_type).family in FAMILIES


def test_unsupported_model_type_names_it_and_the_supported_list(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 10}))
    with pytest.raises(ValueError) as err:
        load_hf(tmp_path)
    message = str(err.value)
    assert "'gpt2'" in message
    for model_type in supported_model_types():
        assert model_type in message


def test_unknown_family_name():
    with pytest.raises(ValueError, match="supported families"):
        get_spec("gpt2")


def test_missing_config_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        read_hf_config(tmp_path)


def test_tiny_configs_map_to_the_expected_architecture(tiny_checkpoints):
    _, gemma = read_hf_config(tiny_checkpoints["gemma3"])
    assert gemma.layer_types == ["sliding_attention", "full_attention"]
    assert gemma.sliding_window == 8
    assert gemma.rope["sliding_attention"].theta == 10_000.0
    assert gemma.rope["full_attention"].theta == 1_000_000.0
    assert gemma.attn_scale == pytest.approx(24**-0.5)
    assert gemma.embed_scale == pytest.approx(64**0.5)
    assert gemma.norm_unit_offset and gemma.sandwich_norm and gemma.qk_norm and gemma.tie_embeddings
    _, qwen2 = read_hf_config(tiny_checkpoints["qwen2"])
    assert qwen2.attention_bias and not qwen2.output_bias and qwen2.tie_embeddings
    _, qwen3 = read_hf_config(tiny_checkpoints["qwen3"])
    assert qwen3.qk_norm and not qwen3.attention_bias
    _, llama = read_hf_config(tiny_checkpoints["llama"])
    assert not llama.tie_embeddings and llama.padded_vocab_size == 320


def test_older_config_layouts_are_read(tiny_checkpoints, tmp_path):
    """transformers 4.x wrote `rope_theta`/`rope_scaling` and Gemma's `rope_local_base_freq`."""
    config = json.loads((tiny_checkpoints["gemma3"] / "config.json").read_text())
    del config["rope_parameters"], config["layer_types"]
    config.update(
        rope_theta=500_000.0,
        rope_local_base_freq=20_000.0,
        sliding_window_pattern=2,
        rope_scaling={"rope_type": "linear", "factor": 8.0},
    )
    gemma = get_spec("gemma3").args_from_hf(config)
    assert gemma.layer_types == ["sliding_attention", "full_attention"]
    assert gemma.rope["full_attention"].theta == 500_000.0
    assert gemma.rope["full_attention"].scaling == "linear"
    assert gemma.rope["sliding_attention"].theta == 20_000.0
    assert gemma.rope["sliding_attention"].scaling == "default"

    llama = json.loads((tiny_checkpoints["llama"] / "config.json").read_text())
    del llama["rope_parameters"]
    llama.update(
        rope_theta=500_000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    )
    rope = get_spec("llama").args_from_hf(llama).rope["full_attention"]
    assert (rope.scaling, rope.theta, rope.factor) == ("llama3", 500_000.0, 8.0)


def test_unsupported_rope_type_is_rejected(tiny_checkpoints):
    config = json.loads((tiny_checkpoints["llama"] / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}
    with pytest.raises(ValueError, match="yarn"):
        get_spec("llama").args_from_hf(config)
