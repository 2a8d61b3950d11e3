"""AdamW construction: decay groups, frozen parameters, implementation choice."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from posttrain.config.train import TrainConfig
from posttrain.train.optim import build_optimizer, optimizer_impl


class Tiny(nn.Module):
    def __init__(self, tied: bool = False):
        super().__init__()
        self.embed_tokens = nn.Embedding(16, 8)
        self.proj = nn.Linear(8, 8, bias=True)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 16, bias=False)
        if tied:
            self.head.weight = self.embed_tokens.weight


def _groups(opt: torch.optim.Optimizer, model: nn.Module) -> dict[str, set[str]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {g["name"]: {names[id(p)] for p in g["params"]} for g in opt.param_groups}


def test_decay_only_on_matrices_not_embeddings():
    model = Tiny()
    cfg = TrainConfig(steps=1, lr=1e-3, weight_decay=0.1, betas=(0.8, 0.9), eps=1e-6)
    opt = build_optimizer(model, cfg)
    groups = _groups(opt, model)
    assert groups["decay"] == {"proj.weight", "head.weight"}
    assert groups["no_decay"] == {"embed_tokens.weight", "proj.bias", "norm.weight", "norm.bias"}
    decay = next(g for g in opt.param_groups if g["name"] == "decay")
    no_decay = next(g for g in opt.param_groups if g["name"] == "no_decay")
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert decay["lr"] == 1e-3 and decay["betas"] == (0.8, 0.9) and decay["eps"] == 1e-6


def test_decay_embeddings_option_and_tied_head_listed_once():
    model = Tiny(tied=True)
    cfg = TrainConfig(steps=1, weight_decay=0.1, decay_embeddings=True)
    groups = _groups(build_optimizer(model, cfg), model)
    assert groups["decay"] == {"embed_tokens.weight", "proj.weight"}  # head.weight is the same tensor
    groups = _groups(build_optimizer(model, TrainConfig(steps=1, weight_decay=0.1)), model)
    assert "embed_tokens.weight" in groups["no_decay"]


def test_frozen_params_left_out_and_named_params_accepted():
    model = Tiny()
    for p in model.parameters():
        p.requires_grad_(False)
    model.proj.weight.requires_grad_(True)
    model.norm.weight.requires_grad_(True)
    opt = build_optimizer(model.named_parameters(), TrainConfig(steps=1, weight_decay=0.1))
    assert _groups(opt, model) == {"decay": {"proj.weight"}, "no_decay": {"norm.weight"}}
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(model, TrainConfig(steps=1))


def test_name_heuristic_without_module():
    model = Tiny()
    named = [(n, p) for n, p in model.named_parameters()]
    groups = _groups(build_optimizer(named, TrainConfig(steps=1, weight_decay=0.1)), model)
    assert "embed_tokens.weight" in groups["no_decay"]


@pytest.mark.parametrize("impl", ["auto", "foreach", "for_loop"])
def test_implementations_agree(impl):
    torch.manual_seed(0)
    ref_model, model = Tiny(), Tiny()
    model.load_state_dict(ref_model.state_dict())
    cfg = TrainConfig(steps=1, lr=1e-2, weight_decay=0.1)
    ref = build_optimizer(ref_model, cfg, impl="for_loop")
    opt = build_optimizer(model, cfg, impl=impl)
    if impl == "auto":
        assert optimizer_impl(opt) == "fused"  # the fused CPU kernel exists in this torch
    for _ in range(3):
        for m in (ref_model, model):
            m.zero_grad()
            x = torch.arange(6).view(2, 3)
            m.head(m.norm(m.proj(m.embed_tokens(x)))).square().mean().backward()
        ref.step()
        opt.step()
    for (n, a), (_, b) in zip(ref_model.named_parameters(), model.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)
