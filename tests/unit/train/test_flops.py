"""FLOPs from the architecture against a hand count on a tiny config, and MFU helpers."""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from posttrain.train.flops import (
    LoraAdapter,
    TransformerShape,
    attention_pairs,
    lora_adapters,
    measure_matmul_peak,
    mfu,
    peak_for_precision,
    training_flops,
)

# 2 layers, hidden 8, 2 query heads and 1 KV head of dim 4, gated MLP of 16, vocab 32.
TINY = TransformerShape(
    n_layers=2, hidden=8, n_heads=2, n_kv_heads=1, head_dim=4, intermediate=16, vocab=32
)
DOCS = [3, 5]  # two packed documents, 8 tokens

# Weights per layer:  q 8*8=64  k 8*4=32  v 8*4=32  o 8*8=64  gate/up/down 8*16=128 each
#                     64 + 32 + 32 + 64 + 3*128 = 576
# Linear forward:     2 * 576 * 8 tokens * 2 layers                    = 18,432
# Attention pairs:    doc 3: 1+2+3 = 6, doc 5: 1+2+3+4+5 = 15          -> 21 per layer
# Attention forward:  4 * 2 heads * 4 head_dim * 21 * 2 layers         = 1,344
# Head forward:       2 * 8 * 32 * 8 tokens                            = 4,096
LINEAR_FWD, ATTN_FWD, HEAD_FWD = 18_432, 1_344, 4_096


def test_hand_count_full_finetune():
    count = training_flops(TINY, DOCS)
    assert count.forward == LINEAR_FWD + ATTN_FWD + HEAD_FWD == 23_872
    assert count.backward == 2 * 23_872 == 47_744  # every weight trains: input + weight grads
    assert count.total == 71_616
    assert (count.linear, count.attention, count.head, count.lora) == (3 * 18_432, 3 * 1_344, 3 * 4_096, 0)


def test_head_only_on_trained_positions():
    # 4 of the 8 positions carry a label: head forward 2 * 8 * 32 * 4 = 2,048
    count = training_flops(TINY, DOCS, head_tokens=4)
    assert count.head == 3 * 2_048
    assert count.forward == LINEAR_FWD + ATTN_FWD + 2_048


def test_sliding_window_caps_the_span():
    shape = TransformerShape(**{**TINY.__dict__, "sliding_window": 2, "n_sliding_layers": 1})
    # windowed pairs: doc 3: 1+2+2 = 5, doc 5: 1+2+2+2+2 = 9 -> 14
    assert attention_pairs(DOCS, window=2) == 14
    # one full layer (21 pairs) + one sliding layer (14 pairs): 4 * 2 * 4 * (21 + 14) = 1,120
    assert training_flops(shape, DOCS).attention == 3 * 1_120


def test_lora_counts_adapters_and_frozen_input_grads():
    adapters = lora_adapters(TINY, rank=2, roles=["q", "v"])
    assert adapters[:2] == [LoraAdapter(8, 8, 2), LoraAdapter(8, 4, 2)] and len(adapters) == 4
    # adapter forward per token: q 2*2*(8+8) = 64, v 2*2*(8+4) = 48 -> 112 per layer
    # 112 * 2 layers * 8 tokens = 1,792
    count = training_flops(TINY, DOCS, lora=adapters)
    assert count.lora == 3 * 1_792  # adapters train: 2x backward
    assert count.linear == 2 * LINEAR_FWD  # frozen base: input gradients only (1x)
    assert count.head == 2 * HEAD_FWD  # frozen head: input gradient only
    assert count.attention == 3 * ATTN_FWD  # no weights: always 2x backward
    assert count.forward == LINEAR_FWD + ATTN_FWD + HEAD_FWD + 1_792 == 25_664
    assert count.backward == LINEAR_FWD + 2 * ATTN_FWD + HEAD_FWD + 2 * 1_792 == 28_800
    # a trained head under LoRA (or trained tied embeddings)
    assert training_flops(TINY, DOCS, lora=adapters, train_head=True).head == 3 * HEAD_FWD


def test_attention_pairs_formula():
    assert attention_pairs([1, 2, 10]) == 1 + 3 + 55
    assert attention_pairs([10], window=4) == 10 + 6 * 4  # 1+2+3+4, then six queries seeing 4
    assert attention_pairs([10], window=10) == 55 and attention_pairs([]) == 0


class TinyBlockStack(nn.Module):
    """Only the matrix products of TINY (no attention core): checks the linear / head count."""

    def __init__(self, shape: TransformerShape):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleDict({r: nn.Linear(i, o, bias=False) for r, (i, o) in shape.layer_linears().items()})
            for _ in range(shape.n_layers)
        )
        self.head = nn.Linear(shape.hidden, shape.vocab, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            q, k, v = layer["q"](x), layer["k"](x), layer["v"](x)
            x = x + layer["o"](q + torch.cat([k, v], -1))
            x = x + layer["down"](F.silu(layer["gate"](x)) * layer["up"](x))
        return self.head(x)


def test_linear_and_head_match_torch_flop_counter():
    model = TinyBlockStack(TINY)
    x = torch.randn(8, 8, requires_grad=True)  # 8 tokens; input grads counted, as in the model
    with FlopCounterMode(display=False) as counter:
        model(x).sum().backward()
    ours = training_flops(TINY, DOCS)
    assert counter.get_total_flops() == ours.linear + ours.head


def test_from_model_args():
    args = types.SimpleNamespace(
        num_layers=6, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16,
        intermediate_size=128, vocab_size=100, tie_embeddings=True, sliding_window=8,
        layer_types=["sliding_attention"] * 5 + ["full_attention"],
    )
    shape = TransformerShape.from_model_args(args)
    assert (shape.n_layers, shape.n_sliding_layers, shape.sliding_window, shape.tied_head) == (6, 5, 8, True)
    assert shape.matmul_params() == 6 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128) + 64 * 100


def test_mfu_and_measured_peak():
    assert mfu(2e12, 2.0, 1e12) == 1.0
    with pytest.raises(ValueError):
        mfu(1.0, 0.0, 1.0)
    peak = measure_matmul_peak(torch.float32, "cpu", n=128, reps=3)
    assert peak > 1e6
    assert measure_matmul_peak(torch.float32, "cpu", n=128, reps=3) == peak  # cached
    with pytest.raises(ValueError, match="unknown precision"):
        peak_for_precision("fp8")
