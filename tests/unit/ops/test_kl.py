import pytest
import torch

from posttrain.ops import linear_kl
from tests.unit.ops.helpers import IGNORE, grads, make_inputs, rel_err


def reference_kl(hidden, weight, labels, teacher_logits, temperature, vocab_size):
    keep = labels != IGNORE
    log_s = torch.log_softmax((hidden.double() @ weight.double()[:vocab_size].t())[keep] / temperature, -1)
    log_t = torch.log_softmax(teacher_logits.double()[keep][:, :vocab_size] / temperature, -1)
    return (log_t.exp() * (log_t - log_s)).sum(-1).sum() / max(int(keep.sum()), 1)


@pytest.mark.parametrize("source", ["logits", "hidden"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kl_matches_full_logits(source, temperature):
    vocab = 90
    hidden, weight, labels = make_inputs(vocab=vocab, padded=96)
    gen = torch.Generator().manual_seed(7)
    t_hidden = torch.randn(*labels.shape, 24, generator=gen)
    t_weight = torch.randn(100, 24, generator=gen) * 0.5
    t_logits = t_hidden @ t_weight.t()
    teacher = (
        dict(teacher_logits=t_logits) if source == "logits" else dict(teacher_hidden=t_hidden, teacher_weight=t_weight)
    )
    kl = linear_kl(
        hidden, weight, labels, temperature=temperature, vocab_size=vocab,
        chunk_size=7, vocab_chunk_size=32, **teacher,
    )  # fmt: skip
    ref = reference_kl(hidden, weight, labels, t_logits, temperature, vocab)
    assert rel_err(kl, ref) <= 1e-5
    for x, y in zip(grads(kl, hidden, weight), grads(ref, hidden, weight)):
        assert rel_err(x, y) <= 1e-5


def test_kl_of_identical_models_is_zero():
    hidden, weight, labels = make_inputs()
    kl = linear_kl(hidden, weight, labels, teacher_hidden=hidden.detach(), teacher_weight=weight.detach())
    assert abs(float(kl.detach())) < 1e-6


def test_kl_needs_exactly_one_teacher():
    hidden, weight, labels = make_inputs()
    with pytest.raises(ValueError, match="teacher"):
        linear_kl(hidden, weight, labels)
    with pytest.raises(ValueError, match="teacher_logits shape"):
        linear_kl(hidden, weight, labels, teacher_logits=torch.randn(3, 17, 10))
