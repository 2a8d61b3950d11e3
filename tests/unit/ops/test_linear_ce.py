import pytest
import torch
import torch.nn.functional as F

from posttrain.ops import linear_cross_entropy
from tests.unit.ops.helpers import IGNORE, grads, make_inputs, naive_ce, rel_err

FP32_TOL = 1e-5
# both gradient strategies: logits recomputed in backward (default), gradients computed in forward
STRATEGIES = pytest.mark.parametrize("gif", [False, True], ids=["recompute", "grads-in-forward"])


def check_against_naive(hidden, weight, labels, tol=FP32_TOL, **kwargs):
    """Values and gradients of ours vs the naive path (same kwargs), relative `tol`."""
    ours_only = ("chunk_size", "vocab_chunk_size", "grads_in_forward")
    chunks = {k: kwargs.pop(k) for k in ours_only if k in kwargs}
    ours = linear_cross_entropy(hidden, weight, labels, **chunks, **kwargs)
    ref = naive_ce(hidden, weight, labels, **kwargs)
    assert ours.dtype == torch.float32 and ours.shape == ref.shape
    assert rel_err(ours, ref) <= tol
    upstream = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1)) if ref.dim() else torch.tensor(1.7)
    g_ours = grads((ours * upstream).sum(), hidden, weight)
    g_ref = grads((ref * upstream).sum(), hidden, weight)
    for g, r, x in zip(g_ours, g_ref, (hidden, weight)):
        assert g.dtype == x.dtype and g.shape == x.shape
        assert rel_err(g, r) <= tol, (rel_err(g, r), x.shape)
    return ours, g_ours


@pytest.mark.parametrize(
    "reduction,gif",
    [("mean", False), ("sum", False), ("none", False), ("mean", True), ("sum", True)],
    ids=["mean", "sum", "none", "mean-grads-in-forward", "sum-grads-in-forward"],
)
@pytest.mark.parametrize(
    "chunk_size,vocab_chunk_size",
    [(2048, 8192), (7, 13), (1, 97), (50, 1)],
    ids=["chunk>tokens", "non-divisible", "one-token-chunks", "one-row-chunks"],
)
def test_matches_naive_fp32(reduction, chunk_size, vocab_chunk_size, gif):
    hidden, weight, labels = make_inputs()
    check_against_naive(
        hidden, weight, labels, reduction=reduction, chunk_size=chunk_size, vocab_chunk_size=vocab_chunk_size,
        grads_in_forward=gif,
    )  # fmt: skip


def test_grads_in_forward_bounds_its_cached_logits(monkeypatch):
    from posttrain.ops import grads_in_forward

    monkeypatch.setattr(grads_in_forward, "MAX_CACHED_LOGITS_BYTES", 10 * 97 * 4)  # 10 tokens of logits
    hidden, weight, labels = make_inputs()
    check_against_naive(hidden, weight, labels, vocab_chunk_size=40, grads_in_forward=True)


def test_flat_tokens_and_batched_agree():
    hidden, weight, labels = make_inputs(shape=(4, 11))
    check_against_naive(hidden, weight, labels, chunk_size=5, vocab_chunk_size=20)
    flat_h = hidden.detach().reshape(-1, hidden.shape[-1]).requires_grad_()
    check_against_naive(flat_h, weight, labels.reshape(-1), chunk_size=5, vocab_chunk_size=20)


@STRATEGIES
def test_several_token_chunks_accumulate_weight_grad(gif):
    hidden, weight, labels = make_inputs(shape=(300,), dim=16, vocab=50, ignore_frac=0.1)
    check_against_naive(hidden, weight, labels, chunk_size=64, vocab_chunk_size=16, grads_in_forward=gif)


@STRATEGIES
def test_bf16_within_bf16_tolerance_of_fp32_reference(gif):
    hidden, weight, labels = make_inputs(shape=(4, 64), dim=64, vocab=1000, dtype=torch.bfloat16)
    ours = linear_cross_entropy(
        hidden, weight, labels, chunk_size=100, vocab_chunk_size=300, grads_in_forward=gif
    )
    ref = naive_ce(hidden.float(), weight.float(), labels)  # exact answer for these bf16 inputs
    assert ours.dtype == torch.float32
    assert rel_err(ours, ref) < 2e-3
    g_h, g_w = grads(ours, hidden, weight)
    r_h, r_w = grads(ref, hidden, weight)
    assert g_h.dtype == g_w.dtype == torch.bfloat16
    assert rel_err(g_h, r_h) < 2e-2 and rel_err(g_w, r_w) < 2e-2
    # fp32 softmax math beats the all-bf16 naive path on the loss value
    naive_bf16 = F.cross_entropy((hidden @ weight.t()).reshape(-1, 1000), labels.reshape(-1))
    assert abs(ours.item() - ref.item()) < abs(naive_bf16.item() - ref.item())


@STRATEGIES
def test_fp32_matmul_of_bf16_inputs_is_exact_up_to_the_bf16_gradients(gif):
    hidden, weight, labels = make_inputs(shape=(4, 64), dim=64, vocab=1000, dtype=torch.bfloat16)
    ours = linear_cross_entropy(
        hidden, weight, labels, vocab_chunk_size=300, matmul_dtype=torch.float32, grads_in_forward=gif
    )
    ref = naive_ce(hidden.float(), weight.float(), labels)
    assert rel_err(ours, ref) <= FP32_TOL
    for g, r in zip(grads(ours, hidden, weight), grads(ref, hidden, weight)):
        assert g.dtype == torch.bfloat16 and rel_err(g, r) < 4e-3  # one bf16 rounding of an fp32 result


@pytest.mark.parametrize("reduction,gif", [("mean", False), ("sum", False), ("none", False), ("mean", True)])
def test_all_ignored_gives_zero_loss_and_zero_grads(reduction, gif):
    hidden, weight, labels = make_inputs()
    labels.fill_(IGNORE)
    loss = linear_cross_entropy(hidden, weight, labels, reduction=reduction, grads_in_forward=gif)
    assert torch.all(loss == 0)
    g_h, g_w = grads(loss.sum(), hidden, weight)
    assert torch.all(g_h == 0) and torch.all(g_w == 0)


def test_all_ignored_with_zero_global_count():
    hidden, weight, labels = make_inputs()
    labels.fill_(IGNORE)
    for num_valid in (0, torch.tensor(0)):
        loss = linear_cross_entropy(hidden, weight, labels, num_valid=num_valid)
        assert loss.item() == 0.0


@STRATEGIES
def test_one_valid_token(gif):
    hidden, weight, labels = make_inputs()
    labels.fill_(IGNORE)
    labels[1, 5] = 42
    check_against_naive(hidden, weight, labels, chunk_size=4, vocab_chunk_size=10, grads_in_forward=gif)


@STRATEGIES
def test_padded_vocab_rows_get_no_mass_and_no_grad(gif):
    vocab, padded = 97, 128
    hidden, weight, labels = make_inputs(vocab=vocab, padded=padded)
    with torch.no_grad():
        weight[vocab:] = 50.0  # padded rows that would dominate the softmax if they were read
    ours, (_, g_w) = check_against_naive(
        hidden, weight, labels, vocab_size=vocab, vocab_chunk_size=40, grads_in_forward=gif
    )
    assert torch.all(g_w[vocab:] == 0)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_z_loss(reduction):
    hidden, weight, labels = make_inputs()
    check_against_naive(hidden, weight, labels, z_loss=1e-2, reduction=reduction, vocab_chunk_size=30)


@pytest.mark.parametrize("vocab_size", [None, 90])
def test_label_smoothing(vocab_size):
    hidden, weight, labels = make_inputs(vocab=90, padded=97)
    check_against_naive(hidden, weight, labels, label_smoothing=0.1, vocab_size=vocab_size, vocab_chunk_size=30)


@STRATEGIES
def test_z_loss_and_label_smoothing_together(gif):
    hidden, weight, labels = make_inputs(vocab=90, padded=97)
    check_against_naive(
        hidden, weight, labels, z_loss=1e-3, label_smoothing=0.2, chunk_size=8, vocab_chunk_size=33,
        vocab_size=90, grads_in_forward=gif,
    )  # fmt: skip


@STRATEGIES
@pytest.mark.parametrize("as_tensor", [False, True])
def test_num_valid_makes_micro_batches_add_up_to_the_global_mean(as_tensor, gif):
    hidden, weight, labels = make_inputs(shape=(4, 16))
    full = linear_cross_entropy(hidden, weight, labels)
    g_full = grads(full, hidden, weight)

    count = int((labels != IGNORE).sum())
    num_valid = torch.tensor(count) if as_tensor else count
    total = sum(
        linear_cross_entropy(hidden[i : i + 2], weight, labels[i : i + 2], num_valid=num_valid, grads_in_forward=gif)
        for i in (0, 2)
    )
    g_split = grads(total, hidden, weight)
    assert rel_err(total, full) <= FP32_TOL
    for a, b in zip(g_split, g_full):
        assert rel_err(a, b) <= FP32_TOL


def test_reduction_none_has_label_shape_and_zeros_where_ignored():
    hidden, weight, labels = make_inputs()
    losses = linear_cross_entropy(hidden, weight, labels, reduction="none")
    assert losses.shape == labels.shape
    assert torch.all(losses[labels == IGNORE] == 0) and torch.all(losses[labels != IGNORE] > 0)


def test_tied_embedding_gets_both_gradients():
    vocab, dim = 61, 16
    emb = torch.nn.Embedding(vocab, dim)
    ids = torch.randint(0, vocab, (2, 9))
    labels = torch.randint(0, vocab, (2, 9))
    proj = torch.nn.Linear(dim, dim)

    def loss_fn(ce):
        hidden = torch.tanh(proj(emb(ids)))
        return ce(hidden, emb.weight, labels)

    ours = loss_fn(lambda h, w, y: linear_cross_entropy(h, w, y, vocab_chunk_size=7))
    (g_ours,) = grads(ours, emb.weight)
    ref = loss_fn(naive_ce)
    (g_ref,) = grads(ref, emb.weight)
    assert rel_err(g_ours, g_ref) <= FP32_TOL


def test_autocast_computes_in_bf16_and_returns_fp32_grads():
    hidden, weight, labels = make_inputs(shape=(2, 32), vocab=300)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(hidden, weight, labels, vocab_chunk_size=100)
    g_h, g_w = grads(loss, hidden, weight)
    ref = naive_ce(hidden, weight, labels)
    r_h, r_w = grads(ref, hidden, weight)
    assert g_h.dtype == g_w.dtype == torch.float32
    assert 0 < rel_err(loss, ref) < 2e-3  # nonzero: the products really ran in bf16
    assert rel_err(g_h, r_h) < 2e-2 and rel_err(g_w, r_w) < 2e-2


@STRATEGIES
def test_only_weight_or_only_hidden_requires_grad(gif):
    hidden, weight, labels = make_inputs()
    (g_w,) = grads(linear_cross_entropy(hidden.detach(), weight, labels, grads_in_forward=gif), weight)
    (r_w,) = grads(naive_ce(hidden.detach(), weight, labels), weight)
    assert rel_err(g_w, r_w) <= FP32_TOL
    (g_h,) = grads(linear_cross_entropy(hidden, weight.detach(), labels, grads_in_forward=gif), hidden)
    (r_h,) = grads(naive_ce(hidden, weight.detach(), labels), hidden)
    assert rel_err(g_h, r_h) <= FP32_TOL


@STRATEGIES
def test_no_grad_forward(gif):
    hidden, weight, labels = make_inputs()
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, labels, grads_in_forward=gif)
    assert not loss.requires_grad
    assert rel_err(loss, naive_ce(hidden, weight, labels)) <= FP32_TOL


@pytest.mark.parametrize(
    "mutate,kwargs,match",
    [
        (lambda h, w, y: (h, w.t(), y), {}, "transpose"),
        (lambda h, w, y: (h, w, y[:, :-1]), {}, "already shifted"),
        (lambda h, w, y: (h, w, y.float()), {}, "integer"),
        (lambda h, w, y: (h, w.double(), y), {}, "autocast"),
        (lambda h, w, y: (h, w, y.masked_fill(y == IGNORE, -1)), {}, "outside"),
        (lambda h, w, y: (h, torch.cat([w, w[:3]]), y.index_fill(1, torch.tensor([0]), 98)), {"vocab_size": 97},
         r"id 98, outside \[0, 97\)"),
        (lambda h, w, y: (h, w, y), {"vocab_size": 500}, "vocab_size"),
        (lambda h, w, y: (h, w, y), {"reduction": "avg"}, "reduction"),
        (lambda h, w, y: (h, w, y), {"chunk_size": 0}, "chunk_size"),
        (lambda h, w, y: (h, w, y), {"reduction": "sum", "num_valid": 10}, "num_valid"),
        (lambda h, w, y: (h, w, y), {"num_valid": -1}, "num_valid"),
        (lambda h, w, y: (h, w, y), {"label_smoothing": 1.5}, "label_smoothing"),
        (lambda h, w, y: (h, w, y), {"z_loss": -1.0}, "z_loss"),
        (lambda h, w, y: (h, w, y), {"matmul_dtype": torch.int8}, "matmul_dtype"),
        (lambda h, w, y: (h, w, y), {"grads_in_forward": True, "reduction": "none"}, "grads_in_forward"),
    ],
)
def test_user_mistakes_raise_value_error(mutate, kwargs, match):
    hidden, weight, labels = mutate(*make_inputs())
    with pytest.raises(ValueError, match=match):
        linear_cross_entropy(hidden, weight, labels, **kwargs)


def test_dtensor_weight_is_refused_with_the_fsdp2_contract(tmp_path):
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed and no process group of its own")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        hidden, weight, labels = make_inputs()
        sharded = distribute_tensor(weight.detach(), init_device_mesh("cpu", (1,)), [Shard(0)])
        with pytest.raises(ValueError, match="root fully_shard unit"):
            linear_cross_entropy(hidden, sharded, labels)
    finally:
        dist.destroy_process_group()
