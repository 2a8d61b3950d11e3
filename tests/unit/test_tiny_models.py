"""The tiny-checkpoint fixture builds a real, loadable HF checkpoint for every family."""

from __future__ import annotations

import torch

from tests.tiny_models import build_byte_tokenizer


def test_tiny_checkpoint_loads_and_runs(tiny_checkpoint):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()
    assert logits.std() > 0.1  # weights were widened: tokens are distinguishable


def test_byte_tokenizer_round_trips_text():
    tokenizer = build_byte_tokenizer()
    text = "héllo  world\n<|im_end|>"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in ids
