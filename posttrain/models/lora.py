"""LoRA inside our own models: low-rank adapters on chosen linear layers, merge, and PEFT export.

`apply_lora(model, ...)` swaps every `nn.Linear` whose qualified name matches one of the target
patterns for a `LoRALinear` that keeps the original weight frozen and adds `B @ A` scaled by
`alpha / rank`. `B` starts at zero, so the adapted model starts exactly equal to the base model.
"""

from __future__ import annotations

import fnmatch
import json
import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


class LoRALinear(nn.Module):
    """`y = x W^T (+ b) + dropout(x) A^T B^T * scaling` with W (and b) frozen."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {rank}")
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.rank = rank
        self.alpha = alpha
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        factory = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **factory))
        self.disabled = False  # True: the base layer alone (see `adapters_disabled`)
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        # Same family of init as the LoRA paper / PEFT default: A ~ Kaiming-uniform, B = 0.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if self.disabled:
            return out
        return out + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    def merged_linear(self) -> nn.Linear:
        """A plain `nn.Linear` with the adapter folded into its weight."""
        linear = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device=self.weight.device,
            dtype=self.weight.dtype,
        )
        with torch.no_grad():
            linear.weight.copy_((self.weight.float() + self.delta_weight()).to(self.weight.dtype))
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, rank={self.rank}, alpha={self.alpha}"


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run `model` as its base model: every `LoRALinear` skips its adapter inside the block.

    This is how a LoRA policy serves as its own frozen reference (DPO, RL) without a second copy
    of the weights. Modules trained in full (`trainable_modules`) are not reverted.
    """
    modules = [m for m in model.modules() if isinstance(m, LoRALinear)]
    previous = [m.disabled for m in modules]
    for m in modules:
        m.disabled = True
    try:
        yield model
    finally:
        for m, state in zip(modules, previous):
            m.disabled = state


def _matches(name: str, patterns: Iterable[str]) -> bool:
    """A pattern matches a qualified module name or its last component (fnmatch syntax)."""
    leaf = name.rsplit(".", 1)[-1]
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(leaf, p) for p in patterns)


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, leaf, module)


def apply_lora(
    model: nn.Module,
    *,
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    target_modules: Iterable[str],
    trainable_modules: Iterable[str] = (),
) -> list[str]:
    """Freeze `model`, add adapters to matching linears, unfreeze `trainable_modules` fully.

    Returns the qualified names of the adapted modules. Raises ValueError when no linear layer
    matches, listing the linear names that exist so the config can be fixed.
    """
    target_modules = list(target_modules)
    trainable_modules = list(trainable_modules)
    for param in model.parameters():
        param.requires_grad_(False)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    adapted = [n for n, _ in linears if _matches(n, target_modules)]
    if not adapted:
        leaves = sorted({n.rsplit(".", 1)[-1] for n, _ in linears})
        raise ValueError(
            f"lora.target_modules {target_modules} matched no linear layer; "
            f"linear layer names in this model: {leaves}"
        )
    modules = dict(linears)
    for name in adapted:
        _set_submodule(model, name, LoRALinear(modules[name], rank, alpha, dropout))
    if trainable_modules:
        matched = False
        for name, module in model.named_modules():
            if name and _matches(name, trainable_modules):
                matched = True
                for param in module.parameters():
                    param.requires_grad_(True)
        if not matched:
            raise ValueError(f"lora.trainable_modules {trainable_modules} matched no module")
    return adapted


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight, in place; the model then has plain linears."""
    for name, module in list(lora_modules(model).items()):
        _set_submodule(model, name, module.merged_linear())
    return model


def lora_parameter_count(model: nn.Module) -> int:
    return sum(m.lora_A.numel() + m.lora_B.numel() for m in lora_modules(model).values())


def save_peft_adapter(
    model: nn.Module,
    out_dir: str | Path,
    *,
    to_hf_name: Callable[[str], str],
    base_model_path: str,
    rank: int,
    alpha: float,
    dropout: float,
) -> Path:
    """Write the adapters as a PEFT LoRA directory that `peft.PeftModel.from_pretrained` loads.

    `to_hf_name` maps one of our parameter names (e.g. `layers.0.attn.q_proj.weight`) to the
    Hugging Face name of the same weight (e.g. `model.layers.0.self_attn.q_proj.weight`).
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    hf_targets: set[str] = set()
    for name, module in lora_modules(model).items():
        hf_weight = to_hf_name(f"{name}.weight")
        hf_module = hf_weight.removesuffix(".weight")
        hf_targets.add(hf_module.rsplit(".", 1)[-1])
        prefix = f"base_model.model.{hf_module}"
        tensors[f"{prefix}.lora_A.weight"] = module.lora_A.detach().contiguous().cpu()
        tensors[f"{prefix}.lora_B.weight"] = module.lora_B.detach().contiguous().cpu()
    save_file(tensors, str(out / "adapter_model.safetensors"))
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_path,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": sorted(hf_targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "use_rslora": False,
        "modules_to_save": None,
    }
    (out / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")
    return out
