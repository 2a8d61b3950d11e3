import math

import pytest
import torch

from posttrain.models.common import (
    Decoder,
    ModelArgs,
    RopeArgs,
    available_backends,
    causal_attention,
    get_backend,
    packed_attention,
    padded_attention,
)
from posttrain.models.common import backends
from posttrain.models.common.norms import RMSNorm
from posttrain.models.common.rope import inverse_frequencies


def tiny_args(**overrides) -> ModelArgs:
    fields = dict(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
    )
    fields.update(overrides)
    return ModelArgs(**fields)


def test_llama3_rope_frequencies_match_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = {
        "rope_type": "llama3",
        "rope_theta": 500_000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    config = LlamaConfig(hidden_size=2048, num_attention_heads=16, rope_parameters=params)
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](config)
    ours = inverse_frequencies(
        RopeArgs(
            theta=500_000.0,
            scaling="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        ),
        head_dim=128,
    )
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)
    # All three regimes occur: kept, divided by the factor, interpolated.
    plain = inverse_frequencies(RopeArgs(theta=500_000.0), 128)
    ratio = plain / ours
    assert (ratio == 1).any() and (ratio == 8).any() and ((ratio > 1) & (ratio < 8)).any()


@pytest.mark.parametrize("unit_offset", [False, True])
def test_rmsnorm_matches_transformers_in_bf16(unit_offset):
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    weight = torch.randn(48)
    x = torch.randn(3, 5, 48).to(torch.bfloat16)
    ref = Gemma3RMSNorm(48, eps=1e-6) if unit_offset else LlamaRMSNorm(48, eps=1e-6)
    ours = RMSNorm(48, eps=1e-6, unit_offset=unit_offset)
    with torch.no_grad():
        ref.weight.copy_(weight)
        ours.weight.copy_(weight)
    ref, ours = ref.to(torch.bfloat16), ours.to(torch.bfloat16)
    assert torch.equal(ours(x), ref(x))


def test_padded_vocab_never_wins_and_head_is_exposed():
    torch.manual_seed(0)
    model = Decoder(tiny_args(tie_embeddings=True))
    model.init_weights()
    assert model.vocab_size == 100 and model.padded_vocab_size == 128
    assert model.head_weight.shape == (128, 32)
    assert model.head_weight.data_ptr() == model.tok_embeddings.weight.data_ptr()
    hidden = -model(torch.randint(0, 100, (2, 7)))  # push real logits negative: zero rows would win
    logits = model.logits(hidden)
    assert torch.isinf(logits[..., 100:]).all() and (logits[..., 100:] < 0).all()
    assert (logits.argmax(-1) < 100).all()
    assert torch.softmax(logits.float(), -1)[..., 100:].sum() == 0

    untied = Decoder(tiny_args())
    assert untied.head_weight is untied.output.weight


def test_final_logit_softcap():
    torch.manual_seed(0)
    model = Decoder(tiny_args(final_logit_softcap=2.0))
    model.init_weights(std=1.0)
    logits = model.logits(model(torch.randint(0, 100, (1, 5))))
    assert logits[..., :100].abs().max() <= 2.0


def test_packed_attention_segments():
    cu = torch.tensor([0, 3, 6, 8, 12], dtype=torch.int32)  # row 0: docs of 3 and 3; row 1: 2 and 4
    meta = packed_attention(cu, max_seqlen=4, batch_size=2, seq_len=6)
    seg = meta.q_segments.tolist()
    assert (
        seg[0][:3] == [seg[0][0]] * 3 and seg[0][3:] == [seg[0][3]] * 3 and seg[0][0] != seg[0][3]
    )
    assert (
        seg[1][:2] == [seg[1][0]] * 2 and seg[1][2:] == [seg[1][2]] * 4 and seg[1][0] != seg[1][2]
    )
    assert meta.varlen_boundaries() == (meta.cu_seqlens, 4) and torch.equal(meta.cu_seqlens, cu)


def test_padded_attention_runs_and_decode_offset():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    meta = padded_attention(mask)
    cu, longest = meta.varlen_boundaries()
    assert cu.tolist() == [0, 2, 5, 10] and longest == 5
    step = padded_attention(torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1), query_len=1)
    assert (step.q_len, step.k_len, step.q_offset) == (1, 6, 5)


def naive_attention(q, k, v, allowed, scale):
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, -1) @ v


@pytest.fixture(params=[False, True], ids=["gqa", "repeated-kv"])
def sdpa_repeats_kv(request, monkeypatch):
    """Run `sdpa` both ways: grouped heads (CPU's path) and keys/values repeated to full heads
    (CUDA's path whenever a mask or fp32 rules out the flash kernel)."""
    if request.param:
        monkeypatch.setattr(backends, "sdpa_expands_kv", lambda *args, **kwargs: True)
    return request.param


def test_sdpa_repeats_grouped_kv_only_where_cuda_would_use_the_math_kernel():
    assert not backends.sdpa_expands_kv("cpu", torch.float32, masked=True)
    assert not backends.sdpa_expands_kv("cuda", torch.bfloat16, masked=False)  # flash takes GQA
    assert backends.sdpa_expands_kv("cuda", torch.bfloat16, masked=True)
    assert backends.sdpa_expands_kv("cuda", torch.float32, masked=False)


@pytest.mark.parametrize("backend", available_backends())
@pytest.mark.parametrize("window", [None, 3])
def test_backends_match_a_naive_reference(backend, window, sdpa_repeats_kv):
    if sdpa_repeats_kv and backend != "sdpa":
        pytest.skip("only sdpa repeats keys/values")
    torch.manual_seed(0)
    batch, length = 2, 10
    q = torch.randn(batch, 4, length, 8)
    k, v = torch.randn(batch, 2, length, 8), torch.randn(batch, 2, length, 8)
    cu = torch.tensor([0, 4, 10, 13, 20], dtype=torch.int32)
    meta = packed_attention(cu, 7, batch, length)
    seg = meta.q_segments
    i = torch.arange(length)
    allowed = i[None, :] <= i[:, None]
    if window is not None:
        allowed &= (i[:, None] - i[None, :]) < window
    allowed = (allowed[None] & (seg[:, :, None] == seg[:, None, :]))[:, None]
    expected = naive_attention(q, k, v, allowed, 0.3)
    out = get_backend(backend)(q, k, v, meta, window, 0.3)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    causal = get_backend(backend)(q, k, v, causal_attention(batch, length), window, 0.3)
    expected = naive_attention(
        q,
        k,
        v,
        (i[None, :] <= i[:, None])
        & (True if window is None else (i[:, None] - i[None, :]) < window),
        0.3,
    )
    torch.testing.assert_close(causal, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cu", [[0, 4, 10, 13, 20], [0, 10, 20], [0, 1, 2, 10, 19, 20]],
                         ids=["two-docs-per-row", "one-doc-per-row", "single-token-docs"])
def test_sdpa_per_document_path_matches_the_reference_with_gradients(cu):
    torch.manual_seed(0)
    batch, length = 2, 10
    q = torch.randn(batch, 4, length, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(batch, 2, length, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(batch, 2, length, 8, dtype=torch.float64, requires_grad=True)
    meta = packed_attention(torch.tensor(cu, dtype=torch.int32), 10, batch, length)
    backends.prepare_attention("sdpa", meta, [None])
    assert meta.masks["runs"] is not None and ("sdpa", None) not in meta.masks  # no dense mask built
    assert [sum(r) for r in meta.masks["runs"]] == [length] * batch
    seg = meta.q_segments
    i = torch.arange(length)
    allowed = ((i[None, :] <= i[:, None])[None] & (seg[:, :, None] == seg[:, None, :]))[:, None]
    out = get_backend("sdpa")(q, k, v, meta, None, 0.3)
    expected = naive_attention(q, k, v, allowed, 0.3)
    torch.testing.assert_close(out, expected)
    grads = torch.autograd.grad((out * expected.detach()).sum(), (q, k, v))
    expected_grads = torch.autograd.grad((expected * expected.detach()).sum(), (q, k, v))
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want)


def test_sdpa_per_document_path_is_not_taken_where_it_would_be_wrong():
    holes = padded_attention(torch.tensor([[1, 1, 0, 1, 1]]))  # the two real runs see each other
    backends.prepare_attention("sdpa", holes, [None])
    assert holes.masks["runs"] is None and ("sdpa", None) in holes.masks
    left = padded_attention(torch.tensor([[0, 0, 1, 1, 1]]))
    backends.prepare_attention("sdpa", left, [None])
    assert left.masks["runs"] == [[2, 3]]
    windowed = packed_attention(torch.tensor([0, 4, 10], dtype=torch.int32), 6, 1, 10)
    backends.prepare_attention("sdpa", windowed, [3])
    assert "runs" not in windowed.masks  # sliding layers keep the dense mask


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="sdpa"):
        get_backend("xformers")
    if "flash_varlen" not in available_backends():
        with pytest.raises(ValueError, match="flash-attn"):
            get_backend("flash_varlen")


@pytest.mark.parametrize("sliding", [False, True])
def test_kv_cache_decoding_matches_full_forward(sliding):
    torch.manual_seed(0)
    extra = (
        dict(
            layer_types=["sliding_attention", "full_attention"],
            sliding_window=4,
            rope={"sliding_attention": RopeArgs(theta=100.0), "full_attention": RopeArgs()},
        )
        if sliding
        else {}
    )
    model = Decoder(tiny_args(**extra))
    model.init_weights(std=0.2)
    ids = torch.randint(0, 100, (2, 12))
    full = model(ids)
    cache = model.new_cache(batch_size=2, max_len=16)
    steps = [model(ids[:, :5], cache=cache)]
    for t in range(5, 12):
        steps.append(model(ids[:, t : t + 1], cache=cache))
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_kv_cache_takes_dtype_and_heads_from_the_first_keys():
    """Allocated from the compute (bf16 keys of fp32 weights under mixed precision; a tensor-
    parallel rank's share of the heads), not from the model's stored weights."""
    cache = Decoder(tiny_args()).new_cache(batch_size=3, max_len=10)
    assert cache.keys == [None, None]
    k = torch.randn(3, 1, 4, 8, dtype=torch.bfloat16)
    keys, values = cache.update(0, k, k + 1)
    assert cache.keys[0].shape == (3, 1, 10, 8) and cache.keys[0].dtype == torch.bfloat16
    assert torch.equal(keys, k) and torch.equal(values, k + 1)
    assert cache.keys[1] is None  # each layer on its own first update
    cache.advance(4)
    cache.keep_rows(torch.tensor([2, 2, 0, 1]))  # repeats copy a row
    assert cache.batch_size == 4 and torch.equal(cache.keys[0][:2, :, :4], k[[2, 2]])
    assert cache.keys[1] is None


def test_model_args_validation():
    with pytest.raises(ValueError, match="layer_types"):
        tiny_args(layer_types=["full_attention"])
    with pytest.raises(ValueError, match="multiple"):
        tiny_args(num_kv_heads=3)
    assert math.isclose(tiny_args().softmax_scale, 8**-0.5)


def test_masks_are_built_once_per_window_before_the_layers():
    model = Decoder(
        tiny_args(
            num_layers=3,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            sliding_window=4,
            rope={"sliding_attention": RopeArgs(), "full_attention": RopeArgs()},
        )
    )
    model.init_weights()
    meta = packed_attention(torch.tensor([0, 5, 12], dtype=torch.int32), 7, 1, 12)
    model(torch.randint(0, 100, (1, 12)), attn=meta)
    assert set(meta.masks) == {"runs", ("sdpa", 4)}  # on CPU full layers run per document


def test_compiled_blocks_keep_the_per_document_path_without_recompiling():
    from torch._dynamo.testing import CompileCounter

    torch.manual_seed(0)
    model = Decoder(tiny_args(num_layers=2))
    model.init_weights()
    layouts = ([0, 5, 12], [0, 3, 9, 12], [0, 12])
    eager = [model(torch.arange(12)[None] % 100, attn=packed_attention(torch.tensor(cu, dtype=torch.int32), 12, 1, 12))
             for cu in layouts]
    counter = CompileCounter()
    torch._dynamo.reset()
    for block in model.layers:
        block.compile(backend=counter)
    for cu, expected in zip(layouts, eager):
        meta = packed_attention(torch.tensor(cu, dtype=torch.int32), 12, 1, 12)
        torch.testing.assert_close(model(torch.arange(12)[None] % 100, attn=meta), expected)
        assert "runs" in meta.masks and ("sdpa", None) not in meta.masks
    frames = counter.frame_count
    assert frames > 0
    meta = packed_attention(torch.tensor([0, 1, 12], dtype=torch.int32), 11, 1, 12)
    model(torch.arange(12)[None] % 100, attn=meta)
    assert counter.frame_count == frames  # a new layout compiles nothing new
    torch._dynamo.reset()
