"""Tiny random Hugging Face checkpoints for every supported family, built in code.

Each checkpoint is a real `save_pretrained` directory (config.json + model.safetensors) plus a
small byte-level tokenizer with a ChatML chat template, so every code path that reads a Hugging
Face directory can be exercised without a download.
"""

from __future__ import annotations

from pathlib import Path

import torch

FAMILIES = ("llama", "qwen2", "qwen3", "gemma3")

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_byte_tokenizer():
    """A byte-level BPE tokenizer with no merges: 256 byte tokens + ChatML specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_vocab = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(sorted(byte_vocab))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS})
    fast.chat_template = CHATML_TEMPLATE
    return fast


def tiny_config(family: str, vocab_size: int):
    """A 2-layer transformers config of the given family (hidden 64, GQA 4:2)."""
    import transformers as tf

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        bos_token_id=None,
        eos_token_id=None,
    )
    if family == "llama":
        return tf.LlamaConfig(**common, tie_word_embeddings=False, rope_theta=10000.0)
    if family == "qwen2":
        return tf.Qwen2Config(**common, tie_word_embeddings=True, rope_theta=10000.0)
    if family == "qwen3":
        return tf.Qwen3Config(**common, head_dim=16, tie_word_embeddings=False, rope_theta=10000.0)
    if family == "gemma3":
        return tf.Gemma3TextConfig(
            **common,
            head_dim=16,
            sliding_window=8,
            layer_types=["sliding_attention", "full_attention"],
            query_pre_attn_scalar=24,  # differs from head_dim so a wrong scale shows
            rope_theta=1_000_000.0,
            rope_local_base_freq=10_000.0,
            tie_word_embeddings=True,
        )
    raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


def build_tiny_checkpoint(family: str, out_dir: Path, seed: int = 0) -> Path:
    """Write a tiny random checkpoint of `family` (weights + tokenizer) to `out_dir`."""
    tokenizer = build_byte_tokenizer()
    return build_checkpoint_from_config(tiny_config(family, vocab_size=len(tokenizer)), out_dir, seed)


def build_checkpoint_from_config(config, out_dir: Path, seed: int = 0) -> Path:
    """Write a random checkpoint for a transformers `config` (vocabulary of the byte tokenizer)
    plus the byte tokenizer to `out_dir`; for variants of the tiny families (rope scaling, sliding
    windows, soft-capping)."""
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    tokenizer = build_byte_tokenizer()
    config.vocab_size = len(tokenizer)
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Widen the random init so logits differ meaningfully between tokens, and perturb norms and
    # biases so a wrong norm convention (e.g. Gemma's `1 + w`) or a dropped bias shows in parity.
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.08)
            else:
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir
