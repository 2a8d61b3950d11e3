"""The policy loss, its corrections and its precision metrics against values worked out by hand."""

from __future__ import annotations

import math

import torch

from posttrain.rl.policy_loss import PolicyLossSettings, PolicyTokens, correction_weights, kl_estimate, policy_loss


def tokens(logprobs, old=None, rollout=None, adv=None, doc=None, **extra) -> PolicyTokens:
    lp = torch.tensor(logprobs, dtype=torch.float64, requires_grad=True)
    n = len(logprobs)
    doc_t = torch.tensor(doc if doc is not None else [0] * n)
    return PolicyTokens(
        logprobs=lp,
        old=torch.tensor(old if old is not None else [0.0] * n, dtype=torch.float64),
        rollout=torch.tensor(rollout if rollout is not None else [0.0] * n, dtype=torch.float64),
        advantages=torch.tensor(adv if adv is not None else [1.0] * n, dtype=torch.float64),
        doc=doc_t, num_docs=int(doc_t.max()) + 1, **extra)


def test_ppo_clip_low_and_high_by_hand():
    t = tokens([math.log(1.5), math.log(0.5), math.log(1.1)], adv=[1.0, -1.0, -1.0], doc=[0, 1, 2])
    s = PolicyLossSettings(clip_low=0.2, clip_high=0.28)
    loss, metrics, _ = policy_loss(t, s, normaliser=3)
    # token 0: r 1.5 > 1.28 with A > 0 -> -1.28 (no gradient); token 1: r 0.5 < 0.8 with A < 0 -> 0.8
    # (no gradient); token 2: r 1.1 inside -> 1.1, d/dlogp = -A r = 1.1
    assert math.isclose(float(loss.detach()), (-1.28 + 0.8 + 1.1) / 3, rel_tol=1e-12)
    loss.backward()
    torch.testing.assert_close(t.logprobs.grad, torch.tensor([0.0, 0.0, 1.1 / 3], dtype=torch.float64))
    assert float(metrics["clip/high_fraction"][0]) == 1 and float(metrics["clip/low_fraction"][0]) == 1


def test_aggregations_by_hand():
    lp = [math.log(1.0), math.log(1.0), math.log(1.0)]
    adv = [1.0, 2.0, 4.0]  # ratio 1: per-token loss is -A
    t = tokens(lp, adv=adv, doc=[0, 0, 1])
    for aggregation, normaliser, expected in (
        ("token_mean", 3, -7.0 / 3),
        ("seq_mean_token_mean", 2, (-1.5 - 4.0) / 2),
        ("seq_mean_token_sum", 2, (-3.0 - 4.0) / 2),
    ):
        loss, _, _ = policy_loss(t, PolicyLossSettings(aggregation=aggregation), normaliser)
        assert math.isclose(float(loss.detach()), expected, rel_tol=1e-12), aggregation


def test_gspo_uses_the_sequence_ratio():
    # log-ratios log 2 and 0: the sequence ratio is sqrt(2) for both tokens
    t = tokens([math.log(2.0), 0.0], adv=[-1.0, -1.0], doc=[0, 0])
    loss, _, _ = policy_loss(t, PolicyLossSettings(loss="gspo", clip_low=0.2, clip_high=0.28), normaliser=2)
    assert math.isclose(float(loss.detach()), math.sqrt(2.0), rel_tol=1e-12)  # unclipped side: -A r = sqrt 2 > 1.28
    loss.backward()
    # both tokens' losses are r, and d r / d logp_t = r / 2: (2 * r / 2) over the normaliser 2
    torch.testing.assert_close(t.logprobs.grad, torch.full((2,), math.sqrt(2.0) / 2, dtype=torch.float64))
    t2 = tokens([math.log(2.0), 0.0], adv=[1.0, 1.0], doc=[0, 0])
    loss2, _, _ = policy_loss(t2, PolicyLossSettings(loss="gspo", clip_high=0.28), normaliser=2)
    assert math.isclose(float(loss2), -1.28, rel_tol=1e-12)


def test_importance_corrections_by_hand():
    t = tokens([0.0, 0.0], old=[math.log(3.0), math.log(0.5)], rollout=[0.0, 0.0], doc=[0, 0])
    tis, capped = correction_weights(t, PolicyLossSettings(correction="tis", correction_cap=2.0))
    torch.testing.assert_close(tis, torch.tensor([2.0, 0.5], dtype=torch.float64))
    assert capped.tolist() == [True, False]
    mis, masked = correction_weights(t, PolicyLossSettings(correction="mis", correction_cap=2.0))
    torch.testing.assert_close(mis, torch.tensor([0.0, 0.5], dtype=torch.float64))
    assert masked.tolist() == [True, False]
    seq, _ = correction_weights(t, PolicyLossSettings(correction="tis", correction_level="sequence", correction_cap=2.0))
    torch.testing.assert_close(seq, torch.tensor([1.5, 1.5], dtype=torch.float64))
    # the weight multiplies each token's loss: ratio 1 (old == logprobs? no: ratio exp(0 - old))
    s = PolicyLossSettings(correction="mis", correction_cap=2.0, clip_low=10.0 - 9.99, clip_high=100.0)
    loss, metrics, _ = policy_loss(tokens([0.0, 0.0], old=[0.0, 0.0], rollout=[-math.log(3.0), math.log(2.0)],
                                          adv=[1.0, 1.0], doc=[0, 0]), s, normaliser=2)
    assert math.isclose(float(loss.detach()), (0.0 * -1.0 + 0.5 * -1.0) / 2, rel_tol=1e-12)
    assert float(metrics["correction/masked_fraction"][0]) == 1


def test_kl_estimators_and_term():
    lp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    assert math.isclose(float(kl_estimate(lp, ref, "k1")), math.log(2.0), rel_tol=1e-6)
    assert math.isclose(float(kl_estimate(lp, ref, "k3")), math.log(2.0) - 0.5, rel_tol=1e-6)
    t = tokens([math.log(0.5)], old=[math.log(0.5)], adv=[0.0], ref=torch.tensor([math.log(0.25)], dtype=torch.float64))
    loss, metrics, _ = policy_loss(t, PolicyLossSettings(beta=0.1, kl="k1"), normaliser=1)
    assert math.isclose(float(loss.detach()), 0.1 * math.log(2.0), rel_tol=1e-12)
    assert math.isclose(float(metrics["kl"][0]), math.log(2.0), rel_tol=1e-12)


def test_mismatch_metrics_by_hand():
    d = [0.1, -1.0, 0.0]
    t = tokens([0.0, 0.0, 0.0], old=d, rollout=[0.0, 0.0, 0.0], doc=[0, 0, 1])
    _, metrics, maxima = policy_loss(t, PolicyLossSettings(), normaliser=3)

    def mean(name):
        total, count = metrics[name]
        return float(total) / float(count)

    assert math.isclose(mean("mismatch/kl_k3"), sum(math.exp(x) - 1 - x for x in d) / 3, rel_tol=1e-12)
    assert math.isclose(mean("mismatch/abs_logprob_diff"), 1.1 / 3, rel_tol=1e-12)
    assert math.isclose(mean("mismatch/ratio_outside_0.5_2"), 1 / 3, rel_tol=1e-12)
    assert math.isclose(mean("mismatch/seq_max_abs_logprob_diff"), (1.0 + 0.0) / 2, rel_tol=1e-12)
    assert float(maxima["mismatch/max_abs_logprob_diff"]) == 1.0
