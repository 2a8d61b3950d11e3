"""The objective protocol inside the step engine: normalisers, metrics as global means, prepare,
and the field checks."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from posttrain.data.batch import IGNORE_INDEX, Sample, collate
from posttrain.train.objective import MetricTotals, Objective, ObjectiveOutput, check_fields, normaliser_count
from posttrain.train.step import evaluate_objective, train_step
from tests.unit.train.test_step import TinyLM


def batch_of(docs: list[list[int]], row_length: int = 8, **fields):
    samples = [Sample(d, d[1:] + [IGNORE_INDEX], fields={k: v[i] for k, v in fields.items()} or None)
               for i, d in enumerate(docs)]
    return collate([[s] for s in samples], row_length, pad_id=0)


class SequenceMeanCE(Objective):
    """Mean over documents of each document's mean token CE; reports the share of long docs."""

    name = "sequence_mean_ce"
    normaliser = "sequences"

    def compute(self, model, batch, normaliser):
        logits = model(batch.input_ids)
        token = F.cross_entropy(logits.flatten(0, 1), batch.labels.flatten(), reduction="none")
        docs = batch.document_ids.flatten()
        trained = (batch.labels.flatten() != IGNORE_INDEX) & (docs >= 0)
        per_doc = torch.zeros(batch.num_documents).index_add(0, docs[trained], token[trained])
        counts = torch.zeros(batch.num_documents).index_add(0, docs[trained], torch.ones(int(trained.sum())))
        long_docs = (counts > 3).float().sum()
        return ObjectiveOutput((per_doc / counts).sum() / normaliser,
                               {"long_share": (long_docs, batch.num_documents)})


DOCS = [[1, 2, 3, 4, 5, 6], [7, 8, 9], [2, 4, 6, 8, 10], [3, 3]]


def test_sequence_normaliser_and_metrics_do_not_depend_on_the_split():
    torch.manual_seed(0)
    model_a = TinyLM()
    model_b = copy.deepcopy(model_a)
    whole = [batch_of(DOCS)]
    split = [batch_of(DOCS[:1]), batch_of(DOCS[1:])]
    stats_a = train_step(model_a, torch.optim.SGD(model_a.parameters(), lr=0.1), whole, SequenceMeanCE(),
                         grad_clip=None)
    stats_b = train_step(model_b, torch.optim.SGD(model_b.parameters(), lr=0.1), split, SequenceMeanCE(),
                         grad_clip=None)
    assert stats_a.num_units == stats_b.num_units == 4
    assert stats_a.loss == pytest.approx(stats_b.loss, rel=1e-6)
    assert stats_a.metrics == stats_b.metrics == {"long_share": 0.5}  # 2 of 4 docs have > 3 trained
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)


def test_normaliser_counts():
    batch = batch_of(DOCS)
    assert normaliser_count("tokens", batch) == batch.num_trained_tokens == sum(len(d) - 1 for d in DOCS)
    assert normaliser_count("sequences", batch) == 4
    assert normaliser_count("pairs", batch) == 2
    with pytest.raises(ValueError, match="unknown normaliser 'rows'"):
        normaliser_count("rows", batch)


def test_metric_totals_are_sum_over_count_and_nan_when_empty():
    totals = MetricTotals("cpu")
    totals.add({"acc": (torch.tensor(3.0), 4), "kl": (0.0, 0)})
    totals.add({"acc": (1.0, torch.tensor(4)), "kl": (0.0, 0)})
    means = totals.means()
    assert means["acc"] == 0.5
    assert means["kl"] != means["kl"]  # NaN


class NeedsAdvantage(Objective):
    name = "needs_advantage"
    required_fields = frozenset({"advantage"})
    optional_fields = frozenset({"old_logprobs"})


def test_field_checks_name_what_is_missing_or_unused():
    plain = batch_of(DOCS[:1])
    with pytest.raises(ValueError, match=r"objective 'needs_advantage' needs the batch field\(s\) \['advantage'\]"):
        check_fields(NeedsAdvantage(), plain)
    check_fields(NeedsAdvantage(), plain.with_fields(advantage=torch.ones(plain.shape)))
    extra = plain.with_fields(advantage=torch.ones(plain.shape), teacher=torch.ones(plain.shape))
    with pytest.raises(ValueError, match=r"carries field\(s\) \['teacher'\] that objective 'needs_advantage' does not use"):
        check_fields(NeedsAdvantage(), extra)


class PreparedCE(Objective):
    """Token CE weighted by a field that `prepare` writes without gradients."""

    name = "prepared_ce"
    required_fields = frozenset({"weight"})

    def __init__(self):
        self.grad_enabled_in_prepare = None

    def prepare(self, batch):
        self.grad_enabled_in_prepare = torch.is_grad_enabled()
        return batch.with_fields(weight=torch.full(batch.shape, 2.0))

    def compute(self, model, batch, normaliser):
        logits = model(batch.input_ids)
        token = F.cross_entropy(logits.flatten(0, 1), batch.labels.flatten(), reduction="none")
        return ObjectiveOutput((token * batch.fields["weight"].flatten()).sum() / normaliser)


def test_prepare_runs_without_grad_and_feeds_compute():
    torch.manual_seed(0)
    model = TinyLM()
    batch = batch_of(DOCS)
    objective = PreparedCE()
    with torch.no_grad():
        logits = model(batch.input_ids)
        plain = F.cross_entropy(logits.flatten(0, 1), batch.labels.flatten()).item()
    assert evaluate_objective(model, [batch], objective)["loss"] == pytest.approx(2 * plain, rel=1e-6)
    assert objective.grad_enabled_in_prepare is False
