"""`linear_distill` against a naive full-logit reference: values, metrics and both gradients."""

import math

import pytest
import torch

from posttrain.ops.distill import DistillLoss, TopK, linear_distill
from tests.unit.ops.helpers import IGNORE, grads, make_inputs, rel_err

VOCAB, PADDED = 90, 96


def reference_divergence(log_p, log_q, loss: DistillLoss):
    """Per-row divergence between two distributions given as log-probs (last dimension)."""
    p, q = log_p.exp(), log_q.exp()
    if loss.divergence == "forward_kl":
        return (q * (log_q - log_p)).sum(-1)
    if loss.divergence == "reverse_kl":
        return (p * (log_p - log_q)).sum(-1)
    log_m = torch.log(loss.beta * q + (1 - loss.beta) * p)
    return loss.beta * (q * (log_q - log_m)).sum(-1) + (1 - loss.beta) * (p * (log_p - log_m)).sum(-1)


def reference_topk(t_logits, labels, temperature, k):
    """The table a top-k pass would store: ids, log-probs and tail per trained label."""
    keep = labels != IGNORE
    log_q = torch.log_softmax(t_logits.double()[keep][:, :VOCAB] / temperature, -1)
    values, ids = log_q.topk(k, -1)
    rest = log_q.scatter(1, ids, float("-inf"))
    return TopK(ids, values.float(), torch.logsumexp(rest, -1).float())


def reference_loss(hidden, weight, labels, t_logits, loss: DistillLoss, topk: TopK | None = None, num_valid=None):
    """Full logits in float64: the loss, the per-token divergence and CE."""
    keep = labels != IGNORE
    z = (hidden.double() @ weight.double()[:VOCAB].t())[keep]
    log_p = torch.log_softmax(z / loss.temperature, -1)
    if topk is None:
        log_q = torch.log_softmax(t_logits.double()[keep][:, :VOCAB] / loss.temperature, -1)
        div = reference_divergence(log_p, log_q, loss)
    else:
        ids = topk.ids
        rest = torch.logsumexp(log_p.scatter(1, ids, float("-inf")), -1, keepdim=True)
        bucket_p = torch.cat([log_p.gather(1, ids), rest], 1)
        bucket_q = torch.cat([topk.logprobs.double(), topk.tail.double().unsqueeze(1)], 1)
        div = reference_divergence(bucket_p, bucket_q, loss)
    ce = -torch.log_softmax(z, -1).gather(1, labels[keep].unsqueeze(1)).squeeze(1)
    count = num_valid if num_valid is not None else max(int(keep.sum()), 1)
    total = (loss.kd_weight * loss.temperature**2 * div.sum() + (1 - loss.kd_weight) * ce.sum()) / count
    return total, div, ce


def teacher_inputs(labels, seed=7):
    gen = torch.Generator().manual_seed(seed)
    t_hidden = torch.randn(*labels.shape, 24, generator=gen)
    t_weight = torch.randn(100, 24, generator=gen) * 0.5
    return t_hidden, t_weight, t_hidden @ t_weight.t()


LOSSES = [
    DistillLoss("forward_kl"),
    DistillLoss("reverse_kl", temperature=2.0),
    DistillLoss("jsd", beta=0.5),
    DistillLoss("jsd", beta=0.2, temperature=0.7, kd_weight=0.6),
    DistillLoss("forward_kl", temperature=1.5, kd_weight=0.3),
    DistillLoss("reverse_kl", kd_weight=0.0),
]


@pytest.mark.parametrize("loss", LOSSES, ids=lambda l: f"{l.divergence}-b{l.beta}-T{l.temperature}-w{l.kd_weight}")
def test_live_teacher_matches_full_logits(loss):
    hidden, weight, labels = make_inputs(vocab=VOCAB, padded=PADDED)
    t_hidden, t_weight, t_logits = teacher_inputs(labels)
    out = linear_distill(hidden, weight, labels, teacher_hidden=t_hidden, teacher_weight=t_weight, loss=loss,
                         vocab_size=VOCAB, chunk_size=7, vocab_chunk_size=32, num_valid=50)
    ref, div, ce = reference_loss(hidden, weight, labels, t_logits, loss, num_valid=50)
    assert rel_err(out.loss, ref) <= 1e-5
    assert rel_err(out.divergence, div) <= 1e-5 and rel_err(out.ce, ce) <= 1e-5
    for ours, theirs in zip(grads(out.loss, hidden, weight), grads(ref, hidden, weight)):
        assert rel_err(ours, theirs) <= 1e-5
    keep = labels != IGNORE
    teacher_ce = -torch.log_softmax(t_logits.double()[keep][:, :VOCAB], -1).gather(1, labels[keep].unsqueeze(1))
    assert rel_err(out.teacher_ce, teacher_ce.squeeze(1)) <= 1e-5
    student_top = (hidden.detach() @ weight.detach()[:VOCAB].t())[keep].argmax(-1)
    assert torch.equal(out.agree, (student_top == t_logits[keep][:, :VOCAB].argmax(-1)).float())


@pytest.mark.parametrize("loss", LOSSES[:4], ids=lambda l: f"{l.divergence}-T{l.temperature}")
@pytest.mark.parametrize("k", [1, 5])
def test_topk_teacher_matches_bucket_reference(loss, k):
    hidden, weight, labels = make_inputs(vocab=VOCAB, padded=PADDED, seed=3)
    _, _, t_logits = teacher_inputs(labels, seed=4)
    topk = reference_topk(t_logits, labels, loss.temperature, k)
    out = linear_distill(hidden, weight, labels, teacher_topk=topk, loss=loss, vocab_size=VOCAB,
                         chunk_size=5, vocab_chunk_size=16)
    ref, div, _ = reference_loss(hidden, weight, labels, None, loss, topk=topk)
    assert rel_err(out.loss, ref) <= 1e-5 and rel_err(out.divergence, div) <= 1e-5
    for ours, theirs in zip(grads(out.loss, hidden, weight), grads(ref, hidden, weight)):
        assert rel_err(ours, theirs) <= 1e-5
    assert out.teacher_ce is None


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_topk_of_the_whole_vocabulary_is_the_full_divergence(divergence):
    loss = DistillLoss(divergence, temperature=1.3)
    hidden, weight, labels = make_inputs(vocab=VOCAB, padded=PADDED, seed=5)
    t_hidden, t_weight, t_logits = teacher_inputs(labels, seed=6)
    full = linear_distill(hidden, weight, labels, teacher_hidden=t_hidden, teacher_weight=t_weight, loss=loss,
                          vocab_size=VOCAB, chunk_size=8, vocab_chunk_size=32)
    topk = linear_distill(hidden, weight, labels, teacher_topk=reference_topk(t_logits, labels, 1.3, VOCAB),
                          loss=loss, vocab_size=VOCAB, chunk_size=8, vocab_chunk_size=32)
    assert rel_err(topk.loss, full.loss) <= 1e-5
    for ours, theirs in zip(grads(topk.loss, hidden, weight), grads(full.loss, hidden, weight)):
        assert rel_err(ours, theirs) <= 1e-5


def test_small_topk_is_a_lower_bound_of_the_full_divergence():
    hidden, weight, labels = make_inputs(vocab=VOCAB, padded=PADDED, seed=8)
    t_hidden, t_weight, t_logits = teacher_inputs(labels, seed=9)
    for divergence in ("forward_kl", "reverse_kl", "jsd"):
        loss = DistillLoss(divergence)
        full = linear_distill(hidden, weight, labels, teacher_hidden=t_hidden, teacher_weight=t_weight, loss=loss,
                              vocab_size=VOCAB)
        top = linear_distill(hidden, weight, labels, teacher_topk=reference_topk(t_logits, labels, 1.0, 4),
                             loss=loss, vocab_size=VOCAB)
        assert bool((top.divergence <= full.divergence + 1e-6).all())


def test_bf16_inputs_stay_close_to_fp32():
    hidden, weight, labels = make_inputs(vocab=VOCAB, padded=PADDED, seed=10)
    t_hidden, t_weight, _ = teacher_inputs(labels, seed=11)
    loss = DistillLoss("jsd")
    exact = linear_distill(hidden, weight, labels, teacher_hidden=t_hidden, teacher_weight=t_weight, loss=loss,
                           vocab_size=VOCAB)
    low = linear_distill(hidden.detach().bfloat16().requires_grad_(), weight.detach().bfloat16(), labels,
                         teacher_hidden=t_hidden.bfloat16(), teacher_weight=t_weight.bfloat16(), loss=loss,
                         vocab_size=VOCAB)
    assert low.loss.dtype == torch.float32
    assert rel_err(low.loss, exact.loss) <= 0.05


def test_identical_models_have_zero_divergence_and_full_agreement():
    hidden, weight, labels = make_inputs(vocab=VOCAB, padded=PADDED)
    for divergence in ("forward_kl", "reverse_kl", "jsd"):
        out = linear_distill(hidden, weight, labels, teacher_hidden=hidden.detach(), teacher_weight=weight.detach(),
                             loss=DistillLoss(divergence), vocab_size=VOCAB)
        assert float(out.divergence.abs().max()) < 1e-6
        assert bool((out.agree == 1).all())


def test_no_trained_tokens_give_zero_loss_and_gradient():
    hidden, weight, labels = make_inputs(vocab=VOCAB, padded=PADDED)
    labels.fill_(IGNORE)
    t_hidden, t_weight, _ = teacher_inputs(labels)
    out = linear_distill(hidden, weight, labels, teacher_hidden=t_hidden, teacher_weight=t_weight, vocab_size=VOCAB)
    assert float(out.loss.detach()) == 0.0
    g_hidden, g_weight = grads(out.loss, hidden, weight)
    assert float(g_hidden.abs().max()) == 0.0 and float(g_weight.abs().max()) == 0.0


def test_padded_vocabulary_rows_get_no_gradient():
    hidden, weight, labels = make_inputs(vocab=VOCAB, padded=PADDED)
    t_hidden, t_weight, _ = teacher_inputs(labels)
    out = linear_distill(hidden, weight, labels, teacher_hidden=t_hidden, teacher_weight=t_weight,
                         loss=DistillLoss("reverse_kl"), vocab_size=VOCAB)
    _, g_weight = grads(out.loss, hidden, weight)
    assert float(g_weight[VOCAB:].abs().max()) == 0.0


def test_bad_arguments_are_named():
    hidden, weight, labels = make_inputs(vocab=VOCAB, padded=PADDED)
    t_hidden, t_weight, t_logits = teacher_inputs(labels)
    with pytest.raises(ValueError, match="either teacher_hidden"):
        linear_distill(hidden, weight, labels, vocab_size=VOCAB)
    with pytest.raises(ValueError, match="teacher_hidden"):
        linear_distill(hidden, weight, labels, teacher_hidden=t_hidden[:, :-1], teacher_weight=t_weight,
                       vocab_size=VOCAB)
    topk = reference_topk(t_logits, labels, 1.0, 3)
    with pytest.raises(ValueError, match="one row per trained label"):
        linear_distill(hidden, weight, labels, vocab_size=VOCAB,
                       teacher_topk=TopK(topk.ids[1:], topk.logprobs[1:], topk.tail[1:]))
    with pytest.raises(ValueError, match="0 < beta < 1"):
        DistillLoss("jsd", beta=0.0)
    with pytest.raises(ValueError, match="divergence must be one of"):
        DistillLoss("kl")
    assert math.isclose(DistillLoss().temperature, 1.0)


@pytest.mark.parametrize("k, temperature", [(1, 1.0), (7, 2.0), (VOCAB, 0.8)])
def test_linear_topk_matches_full_softmax(k, temperature):
    from posttrain.ops.topk import linear_topk

    _, _, labels = make_inputs(vocab=VOCAB, padded=PADDED, seed=12)
    t_hidden, t_weight, t_logits = teacher_inputs(labels, seed=13)
    out = linear_topk(t_hidden, t_weight, labels, k=k, temperature=temperature, vocab_size=VOCAB,
                      chunk_size=6, vocab_chunk_size=16)
    expected = reference_topk(t_logits, labels, temperature, k)
    assert torch.equal(out.topk.ids, expected.ids)
    assert rel_err(out.topk.logprobs, expected.logprobs) <= 1e-5
    if k < VOCAB:
        assert rel_err(out.topk.tail, expected.tail) <= 1e-5
    else:
        assert bool(torch.isneginf(out.topk.tail).all())
    keep = labels != IGNORE
    ce = -torch.log_softmax(t_logits.double()[keep][:, :VOCAB], -1).gather(1, labels[keep].unsqueeze(1)).squeeze(1)
    assert rel_err(out.ce, ce) <= 1e-5


def test_a_tail_below_fp32_resolution_keeps_its_value():
    from posttrain.ops.topk import linear_topk

    weight = torch.zeros(8, 2)
    weight[0, 0] = 40.0  # token 0 takes all but ~e^-40 of the mass
    hidden = torch.tensor([[1.0, 0.0]])
    out = linear_topk(hidden, weight, torch.tensor([0]), k=1)
    expected = math.log(7) - 40.0 - math.log1p(7 * math.exp(-40.0))
    assert abs(float(out.topk.tail[0]) - expected) <= 1e-5 * abs(expected)


def test_a_second_backward_is_refused():
    hidden, weight, labels = make_inputs(vocab=VOCAB, padded=PADDED)
    t_hidden, t_weight, _ = teacher_inputs(labels)
    out = linear_distill(hidden, weight, labels, teacher_hidden=t_hidden, teacher_weight=t_weight, vocab_size=VOCAB)
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="handed over once"):
        out.loss.backward()
