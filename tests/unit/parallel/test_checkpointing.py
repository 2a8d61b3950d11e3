"""Activation checkpointing: same gradients as no checkpointing, attention not recomputed."""

from __future__ import annotations

import copy

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from posttrain.models.common import Decoder, packed_attention
from posttrain.parallel.checkpointing import apply_activation_checkpointing
from tests.unit.models.test_common import tiny_args


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def forward_backward(model, tokens, cu):
    meta = packed_attention(torch.tensor(cu, dtype=torch.int32), 8, 1, tokens.shape[1])
    with OpCounter() as counter:
        loss = model.logits(model(tokens, attn=meta)).float().square().mean()
        loss.backward()
    grads = {n.replace("_checkpoint_wrapped_module.", ""): p.grad for n, p in model.named_parameters()}
    return loss.detach(), grads, counter.counts


def test_checkpointed_blocks_give_the_same_gradients_and_keep_attention_outputs():
    torch.manual_seed(0)
    plain = Decoder(tiny_args(num_layers=3))
    plain.init_weights()
    wrapped = copy.deepcopy(plain)
    assert apply_activation_checkpointing(wrapped) == 3
    tokens, cu = torch.randint(0, 100, (1, 12)), [0, 5, 12]
    loss, grads, plain_ops = forward_backward(plain, tokens, cu)
    wrapped_loss, wrapped_grads, wrapped_ops = forward_backward(wrapped, tokens, cu)
    assert torch.equal(loss, wrapped_loss)
    for name, grad in grads.items():
        torch.testing.assert_close(wrapped_grads[name], grad,
                                   rtol=1e-6, atol=1e-7 * grad.abs().max().item())
    attention = "_scaled_dot_product_flash_attention_for_cpu"
    assert plain_ops[attention] == wrapped_ops[attention] == 3 * 2  # 2 documents x 3 blocks, once each
    assert wrapped_ops["mm"] > plain_ops["mm"]  # the matmuls are recomputed
