import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from posttrain.models.common import Decoder, ModelArgs
from posttrain.models.hf import build_meta_model, load_hf, read_hf_config, save_hf


def read_tensors(directory) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    return tensors


def test_load_save_round_trip_is_bit_exact(tiny_checkpoint, tmp_path):
    model = load_hf(tiny_checkpoint)
    out = save_hf(model, tmp_path / "export")
    original, exported = read_tensors(tiny_checkpoint), read_tensors(out)
    assert original.keys() == exported.keys()
    for name, tensor in original.items():
        assert exported[name].dtype == tensor.dtype
        assert torch.equal(exported[name], tensor), name
    reloaded = load_hf(out)
    for (name, a), (_, b) in zip(
        model.state_dict().items(), reloaded.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    # The config still describes the same model.
    assert read_hf_config(out)[1] == read_hf_config(tiny_checkpoint)[1]


def test_saved_directory_loads_in_transformers_with_identical_logits(tiny_checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = save_hf(load_hf(tiny_checkpoint), tmp_path / "export")
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer(["hello there, this is a test of the export"], return_tensors="pt")["input_ids"]
    before = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32)
    after = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(before(ids).logits, after(ids).logits)


def test_sharded_checkpoints_load_and_save(tiny_checkpoints, tmp_path):
    from transformers import AutoModelForCausalLM

    model = load_hf(tiny_checkpoints["llama"])
    sharded = save_hf(model, tmp_path / "sharded", max_shard_bytes=40_000)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (sharded / "model.safetensors").exists()
    reloaded = load_hf(sharded)
    for (name, a), (_, b) in zip(
        model.state_dict().items(), reloaded.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    AutoModelForCausalLM.from_pretrained(sharded)  # transformers reads the index too


def test_load_builds_on_meta_then_materialises(tiny_checkpoints):
    _, args = read_hf_config(tiny_checkpoints["qwen3"])
    meta = build_meta_model(args)
    assert all(p.is_meta for p in meta.parameters())
    model = load_hf(tiny_checkpoints["qwen3"], dtype=torch.bfloat16)
    assert not any(p.is_meta for p in model.parameters())
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.rotary["full_attention"].inv_freq.dtype == torch.float32
    # padded vocabulary rows are zero
    assert model.tok_embeddings.weight[model.vocab_size :].abs().sum() == 0


def test_missing_tensor_is_named(tiny_checkpoints, tmp_path):
    source = tiny_checkpoints["llama"]
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((source / "config.json").read_text())
    tensors = load_file(str(source / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(broken / "model.safetensors"))
    with pytest.raises(ValueError, match="model.layers.1.mlp.up_proj.weight"):
        load_hf(broken)


def test_unexpected_tensor_and_non_safetensors_are_rejected(tiny_checkpoints, tmp_path):
    source = tiny_checkpoints["llama"]
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.json").write_text((source / "config.json").read_text())
    tensors = load_file(str(source / "model.safetensors"))
    tensors["model.layers.0.self_attn.rope_scale"] = torch.zeros(1)
    save_file(tensors, str(odd / "model.safetensors"))
    with pytest.raises(ValueError, match="rope_scale"):
        load_hf(odd)
    (odd / "model.safetensors").unlink()
    torch.save({}, odd / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_hf(odd)


def test_tied_checkpoint_with_a_stored_head_uses_the_embedding(tiny_checkpoints, tmp_path):
    source = tiny_checkpoints["qwen2"]  # tied
    copy = tmp_path / "tied"
    copy.mkdir()
    (copy / "config.json").write_text((source / "config.json").read_text())
    tensors = load_file(str(source / "model.safetensors"))
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, str(copy / "model.safetensors"))
    model = load_hf(copy)
    assert model.output is None
    with safe_open(str(save_hf(model, tmp_path / "out") / "model.safetensors"), "pt") as handle:
        assert "lm_head.weight" not in handle.keys()


def test_save_from_scratch_needs_a_model_type(tmp_path):
    model = Decoder(
        ModelArgs(
            vocab_size=100,
            hidden_size=32,
            intermediate_size=64,
            num_layers=1,
            num_heads=4,
            num_kv_heads=2,
            head_dim=8,
        )
    )
    model.init_weights()
    with pytest.raises(ValueError, match="model_type"):
        save_hf(model, tmp_path / "a")
    out = save_hf(model, tmp_path / "b", model_type="llama")
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.randint(0, 100, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(model.logits(model(ids))[..., :100], reference(ids).logits)
