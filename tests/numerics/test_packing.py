"""Packed rows equal separate per-document forwards, on every family and CPU backend."""

import pytest
import torch

from posttrain.models.common import available_backends, packed_attention, padded_attention
from posttrain.models.hf import load_hf
from posttrain.models.verify import left_pad, pack_rows

# Longer than the tiny sliding window (8) so sliding layers really cut context.
DOC_LENGTHS = (11, 23, 9, 17, 30)
TOLERANCE = 1e-5


def documents(vocab: int, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=generator).tolist() for n in DOC_LENGTHS]


def separate(model, docs) -> list[torch.Tensor]:
    return [model(torch.tensor([doc]))[0] for doc in docs]


@pytest.mark.parametrize("backend", available_backends())
@torch.no_grad()
def test_packed_equals_unpacked(tiny_checkpoint, backend):
    model = load_hf(tiny_checkpoint, attention_backend=backend)
    docs = documents(model.vocab_size)
    expected = separate(model, docs)
    packed = pack_rows(docs, rows=2, pad_id=0)
    rows, length = packed["input_ids"].shape
    attn = packed_attention(packed["cu_seqlens"], packed["max_seqlen"], rows, length)
    hidden = model(packed["input_ids"], packed["position_ids"], attn)
    for j, r, start in packed["spans"]:
        got = hidden[r, start : start + len(docs[j])]
        torch.testing.assert_close(got, expected[j], atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("backend", available_backends())
@torch.no_grad()
def test_left_padded_equals_unpadded(tiny_checkpoint, backend):
    model = load_hf(tiny_checkpoint, attention_backend=backend)
    docs = documents(model.vocab_size, seed=1)
    expected = separate(model, docs)
    input_ids, mask, position_ids = left_pad(docs, pad_id=0)
    hidden = model(input_ids, position_ids, padded_attention(mask))
    for i, doc in enumerate(docs):
        torch.testing.assert_close(hidden[i, -len(doc) :], expected[i], atol=TOLERANCE, rtol=0)


@torch.no_grad()
def test_sliding_window_really_limits_context(tiny_checkpoints):
    """Tokens beyond the window must not matter to a sliding layer — but do to a full one."""
    model = load_hf(tiny_checkpoints["gemma3"])
    layer = model.layers[0]  # sliding, window 8
    assert layer.attention.window == 8
    x = torch.randn(1, 20, model.args.hidden_size)
    y = x.clone()
    y[:, :5] = torch.randn(1, 5, model.args.hidden_size)  # differs only > 8 slots before the end
    pos = torch.arange(20)[None]
    ropes = {k: r(pos, x.dtype) for k, r in model.rotary.items()}
    from posttrain.models.common import causal_attention

    attn = causal_attention(1, 20)
    out_x = layer(x, ropes[layer.layer_type], attn, "sdpa")
    out_y = layer(y, ropes[layer.layer_type], causal_attention(1, 20), "sdpa")
    torch.testing.assert_close(out_x[:, 13:], out_y[:, 13:])
    full = model.layers[1]
    out_x = full(x, ropes[full.layer_type], attn, "sdpa")
    out_y = full(y, ropes[full.layer_type], causal_attention(1, 20), "sdpa")
    assert (out_x[:, 13:] - out_y[:, 13:]).abs().max() > 1e-3


@pytest.mark.parametrize("backend", available_backends())
@pytest.mark.parametrize(
    "variant", ["mistral_window", "qwen2_window", "gemma3_softcap_linear_rope"]
)
@torch.no_grad()
def test_packed_equals_unpacked_variants(variant_checkpoints, variant, backend):
    model = load_hf(variant_checkpoints[variant], attention_backend=backend)
    docs = documents(model.vocab_size, seed=2)
    expected = separate(model, docs)
    packed = pack_rows(docs, rows=2, pad_id=0)
    rows, length = packed["input_ids"].shape
    attn = packed_attention(packed["cu_seqlens"], packed["max_seqlen"], rows, length)
    hidden = model(packed["input_ids"], packed["position_ids"], attn)
    for j, r, start in packed["spans"]:
        torch.testing.assert_close(
            hidden[r, start : start + len(docs[j])], expected[j], atol=TOLERANCE, rtol=0
        )
