"""The step engine normalises by the global trained-token count: splitting doesn't matter."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from posttrain.train.objective import Objective, ObjectiveOutput
from posttrain.train.step import evaluate_objective, train_step


@dataclass
class Batch:
    input_ids: torch.Tensor
    labels: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()

    @property
    def num_trained_tokens(self) -> int:
        return int((self.labels != -100).sum())

    @property
    def num_documents(self) -> int:
        return self.input_ids.shape[0]


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.mix = nn.Linear(6, 6)
        self.head = nn.Linear(6, 11, bias=False)

    def forward(self, ids):
        return self.head(torch.tanh(self.mix(self.embed(ids))))


def sum_loss(model, batch, num_valid):
    logits = model(batch.input_ids)
    return F.cross_entropy(logits.flatten(0, 1), batch.labels.flatten(), reduction="sum") / num_valid


class LossFnObjective(Objective):
    """A plain `(model, batch, normaliser) -> loss` function as an objective."""

    def __init__(self, fn):
        self.fn = fn

    def compute(self, model, batch, normaliser):
        return ObjectiveOutput(self.fn(model, batch, normaliser))


CE = LossFnObjective(sum_loss)


def make_batch(generator):
    ids = torch.randint(0, 11, (4, 7), generator=generator)
    labels = torch.randint(0, 11, (4, 7), generator=generator)
    labels[0, :5] = -100  # uneven trained-token counts per row
    labels[2, 1:] = -100
    return Batch(ids, labels)


def test_split_into_micro_batches_gives_same_update():
    g = torch.Generator().manual_seed(0)
    batch = make_batch(g)
    torch.manual_seed(0)
    model_a = TinyLM()
    model_b = copy.deepcopy(model_a)
    opt_a = torch.optim.SGD(model_a.parameters(), lr=0.1)
    opt_b = torch.optim.SGD(model_b.parameters(), lr=0.1)

    stats_a = train_step(model_a, opt_a, [batch], CE, grad_clip=None)
    micro = [Batch(batch.input_ids[i : i + 1], batch.labels[i : i + 1]) for i in range(4)]
    stats_b = train_step(model_b, opt_b, micro, CE, grad_clip=None)

    assert stats_a.num_trained_tokens == stats_b.num_trained_tokens == batch.num_trained_tokens
    assert abs(stats_a.loss - stats_b.loss) <= 1e-6 * abs(stats_a.loss)
    assert abs(stats_a.grad_norm - stats_b.grad_norm) <= 1e-5 * stats_a.grad_norm
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)


def test_loss_is_mean_over_trained_tokens_and_clip_applies():
    g = torch.Generator().manual_seed(1)
    batch = make_batch(g)
    torch.manual_seed(0)
    model = TinyLM()
    with torch.no_grad():
        logits = model(batch.input_ids)
        expected = F.cross_entropy(logits.flatten(0, 1), batch.labels.flatten()).item()
    assert abs(evaluate_objective(model, [batch], CE)["loss"] - expected) < 1e-6
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    stats = train_step(model, opt, [batch], CE, grad_clip=1e-3)
    assert abs(stats.loss - expected) < 1e-6
    assert stats.grad_norm > 1e-3  # the norm before clipping is reported
    assert not stats.skipped


def test_non_finite_gradient_skips_update():
    g = torch.Generator().manual_seed(2)
    batch = make_batch(g)
    model = TinyLM()
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def nan_loss(model, batch, num_valid):
        return sum_loss(model, batch, num_valid) * float("nan")

    stats = train_step(model, opt, [batch], LossFnObjective(nan_loss), grad_clip=1.0)
    assert stats.skipped
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)
