import pytest
import torch

from posttrain.ops import linear_logprobs
from tests.unit.ops.helpers import IGNORE, grads, make_inputs, rel_err


def reference(hidden, weight, targets, temperature=1.0, vocab_size=None):
    """fp64 log_softmax path: log-probs and entropy, zero where ignored."""
    logits = hidden.double() @ weight.double()[: vocab_size or weight.shape[0]].t() / temperature
    log_p = torch.log_softmax(logits, -1)
    keep = targets != IGNORE
    logprobs = log_p.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * keep
    entropy = -(log_p.exp() * log_p).sum(-1) * keep
    return logprobs, entropy


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunks", [(2048, 8192), (5, 13)], ids=["one-tile", "many-tiles"])
def test_logprobs_and_entropy_match_log_softmax(temperature, chunks):
    hidden, weight, targets = make_inputs(shape=(3, 19), vocab=200)
    chunk_size, vocab_chunk_size = chunks
    lp, ent = linear_logprobs(
        hidden, weight, targets, temperature=temperature, return_entropy=True,
        chunk_size=chunk_size, vocab_chunk_size=vocab_chunk_size,
    )  # fmt: skip
    r_lp, r_ent = reference(hidden, weight, targets, temperature)
    assert lp.shape == ent.shape == targets.shape and lp.dtype == ent.dtype == torch.float32
    assert rel_err(lp, r_lp) <= 1e-5 and rel_err(ent, r_ent) <= 1e-5
    assert torch.all(lp[targets == IGNORE] == 0) and torch.all(ent[targets == IGNORE] == 0)

    # gradients of a loss that uses both, as GRPO with an entropy bonus would
    gen = torch.Generator().manual_seed(3)
    a, b = torch.randn(targets.shape, generator=gen), torch.randn(targets.shape, generator=gen)
    g = grads((lp * a + ent * b).sum(), hidden, weight)
    r = grads((r_lp * a + r_ent * b).sum(), hidden, weight)
    for x, y in zip(g, r):
        assert rel_err(x, y) <= 1e-5


def test_low_entropy_tokens_keep_relative_accuracy():
    hidden, weight, targets = make_inputs(shape=(64,), dim=16, vocab=3000, ignore_frac=0.0)
    with torch.no_grad():
        weight.mul_(8)  # peaked distributions: entropy far below lse
    _, ent = linear_logprobs(hidden, weight, targets, return_entropy=True, vocab_chunk_size=256)
    _, r_ent = reference(hidden, weight, targets)
    assert r_ent.min() < 0.05
    assert torch.allclose(ent.double(), r_ent, rtol=1e-4, atol=1e-5)


def test_logprobs_only_gradients():
    hidden, weight, targets = make_inputs()
    lp = linear_logprobs(hidden, weight, targets, chunk_size=6, vocab_chunk_size=25)
    r_lp, _ = reference(hidden, weight, targets)
    for x, y in zip(grads(lp.sum(), hidden, weight), grads(r_lp.sum(), hidden, weight)):
        assert rel_err(x, y) <= 1e-5


def test_padded_vocab_logprobs():
    hidden, weight, targets = make_inputs(vocab=97, padded=128)
    with torch.no_grad():
        weight[97:] = 50.0
    lp, ent = linear_logprobs(hidden, weight, targets, vocab_size=97, return_entropy=True, vocab_chunk_size=32)
    r_lp, r_ent = reference(hidden, weight, targets, vocab_size=97)
    assert rel_err(lp, r_lp) <= 1e-5 and rel_err(ent, r_ent) <= 1e-5
    (g_w,) = grads(lp.sum() + ent.sum(), weight)
    assert torch.all(g_w[97:] == 0)


def test_bf16_logprobs_close_to_fp32_reference():
    hidden, weight, targets = make_inputs(shape=(2, 40), dim=64, vocab=500, dtype=torch.bfloat16)
    lp, ent = linear_logprobs(hidden, weight, targets, return_entropy=True, vocab_chunk_size=128)
    r_lp, r_ent = reference(hidden, weight, targets)
    assert rel_err(lp, r_lp) < 5e-3 and rel_err(ent, r_ent) < 5e-3


def test_fp32_matmul_logprobs_of_bf16_inputs():
    hidden, weight, targets = make_inputs(shape=(2, 40), dim=64, vocab=500, dtype=torch.bfloat16)
    lp, ent = linear_logprobs(
        hidden, weight, targets, return_entropy=True, vocab_chunk_size=128, matmul_dtype=torch.float32
    )
    r_lp, r_ent = reference(hidden, weight, targets)
    assert rel_err(lp, r_lp) <= 1e-5 and rel_err(ent, r_ent) <= 1e-5


def test_all_targets_ignored():
    hidden, weight, targets = make_inputs()
    targets.fill_(IGNORE)
    lp, ent = linear_logprobs(hidden, weight, targets, return_entropy=True)
    assert torch.all(lp == 0) and torch.all(ent == 0)
    g_h, g_w = grads(lp.sum() + ent.sum(), hidden, weight)
    assert torch.all(g_h == 0) and torch.all(g_w == 0)


def test_bad_temperature():
    with pytest.raises(ValueError, match="temperature"):
        linear_logprobs(*make_inputs(), temperature=0.0)
