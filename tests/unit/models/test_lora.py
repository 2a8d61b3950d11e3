"""LoRA adapters: exact start, only adapters train, merge equals the adapted model."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from posttrain.models.lora import (
    LoRALinear,
    apply_lora,
    lora_parameter_count,
    merge_lora,
)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(8, 8, bias=True)
        self.up_proj = nn.Linear(8, 16, bias=False)
        self.down_proj = nn.Linear(16, 8, bias=False)

    def forward(self, x):
        return self.down_proj(torch.relu(self.up_proj(self.q_proj(x))))


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.layers = nn.ModuleList([Block(), Block()])

    def forward(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = x + layer(x)
        return x


def test_adapters_start_at_zero_and_only_they_train():
    torch.manual_seed(0)
    model = Toy()
    ids = torch.randint(0, 10, (2, 5))
    before = model(ids)
    adapted = apply_lora(model, rank=4, alpha=8, target_modules=["q_proj", "down_proj"])
    assert adapted == ["layers.0.q_proj", "layers.0.down_proj", "layers.1.q_proj", "layers.1.down_proj"]
    torch.testing.assert_close(model(ids), before, rtol=0, atol=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"layers.{i}.{m}.lora_{ab}" for i in (0, 1) for m in ("q_proj", "down_proj") for ab in "AB"}
    assert lora_parameter_count(model) == 2 * (4 * 8 + 8 * 4 + 4 * 16 + 8 * 4)


def test_merge_equals_adapted_forward():
    """In float64, so the merged matmul's reassociation stays far below the tolerance on every CPU
    (in fp32 with a random `lora_B` it reaches ~1e-4 absolute on outputs of magnitude ~5)."""
    torch.manual_seed(0)
    model = Toy().double()
    apply_lora(model, rank=4, alpha=16, target_modules=["*_proj"])
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.lora_B.normal_()
    ids = torch.randint(0, 10, (2, 5))
    adapted = model(ids)
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    # merge_lora folds the adapter in fp32 (`delta_weight`), so the merged weight carries fp32
    # rounding: relative error ~1e-7 of the outputs' magnitude.
    torch.testing.assert_close(model(ids), adapted, rtol=1e-6, atol=1e-6 * float(adapted.abs().max()))


def test_trainable_modules_unfrozen():
    model = Toy()
    apply_lora(model, rank=2, alpha=2, target_modules=["q_proj"], trainable_modules=["embed"])
    assert model.embed.weight.requires_grad
    assert not model.layers[0].up_proj.weight.requires_grad


def test_no_match_names_existing_linears():
    with pytest.raises(ValueError, match="up_proj"):
        apply_lora(Toy(), rank=2, alpha=2, target_modules=["nonexistent"])
