"""AdamW over the trainable parameters, with weight decay only where it belongs.

Decay applies to matrices (linear weights, an untied LM head). It never applies to 1-D
parameters (norm scales, biases) or scalars, and applies to embedding tables only when
`train.decay_embeddings` is set. Frozen parameters (`requires_grad=False`, e.g. the base model
under LoRA) are left out entirely, so they hold no optimiser state.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch
import torch.nn as nn

from posttrain.config.train import TrainConfig

NamedParams = Iterable[tuple[str, nn.Parameter]]
Impl = Literal["auto", "fused", "foreach", "for_loop"]


def _embedding_param_ids(model: nn.Module) -> set[int]:
    return {
        id(p)
        for m in model.modules()
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag))
        for p in m.parameters(recurse=False)
    }


def split_decay(
    named_params: NamedParams,
    *,
    decay_embeddings: bool = False,
    embedding_ids: set[int] | None = None,
) -> tuple[list[tuple[str, nn.Parameter]], list[tuple[str, nn.Parameter]]]:
    """(decayed, not decayed) trainable parameters, each listed once.

    A parameter is an embedding if its id is in `embedding_ids` (found from the module types) or,
    when no module is at hand, if its name contains `embed`.
    """
    decay: list[tuple[str, nn.Parameter]] = []
    no_decay: list[tuple[str, nn.Parameter]] = []
    seen: set[int] = set()
    for name, param in named_params:
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        if embedding_ids is not None:
            is_embedding = id(param) in embedding_ids
        else:
            is_embedding = "embed" in name
        if param.ndim < 2 or (is_embedding and not decay_embeddings):
            no_decay.append((name, param))
        else:
            decay.append((name, param))
    return decay, no_decay


def _impl_kwargs(impl: Impl, params: list[nn.Parameter]) -> list[dict[str, bool]]:
    """AdamW keyword choices to try in order: fused, then foreach, then the plain loop."""
    if impl == "fused":
        return [{"fused": True}]
    if impl == "foreach":
        return [{"foreach": True}]
    if impl == "for_loop":
        return [{"foreach": False}]
    fused_ok = all(p.is_floating_point() and not p.is_sparse for p in params)
    return ([{"fused": True}] if fused_ok else []) + [{"foreach": True}, {"foreach": False}]


def build_optimizer(
    model_or_named_params: nn.Module | NamedParams,
    cfg: TrainConfig,
    *,
    impl: Impl = "auto",
) -> torch.optim.AdamW:
    """AdamW from `cfg` (lr, weight_decay, betas, eps, decay_embeddings) over trainable params.

    `impl="auto"` uses the fused kernel when this build supports it for the parameters' device
    and dtype, else the foreach one. Param groups carry a `name` ("decay" / "no_decay").
    """
    if isinstance(model_or_named_params, nn.Module):
        named = list(model_or_named_params.named_parameters())
        embedding_ids = _embedding_param_ids(model_or_named_params)
    else:
        named = list(model_or_named_params)
        embedding_ids = None
    decay, no_decay = split_decay(
        named, decay_embeddings=cfg.decay_embeddings, embedding_ids=embedding_ids
    )
    if not decay and not no_decay:
        raise ValueError("no trainable parameters: every parameter has requires_grad=False")
    groups = [
        {"params": [p for _, p in decay], "weight_decay": cfg.weight_decay, "name": "decay"},
        {"params": [p for _, p in no_decay], "weight_decay": 0.0, "name": "no_decay"},
    ]
    groups = [g for g in groups if g["params"]]
    params = [p for _, p in decay + no_decay]
    errors: list[str] = []
    for kwargs in _impl_kwargs(impl, params):
        try:
            return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, **kwargs)
        except (RuntimeError, ValueError) as err:  # kernel not available for these params
            errors.append(f"{kwargs}: {err}")
    raise RuntimeError("could not build AdamW: " + "; ".join(errors))


def optimizer_impl(optimizer: torch.optim.Optimizer) -> str:
    """Which AdamW implementation an optimiser uses: fused, foreach or for_loop."""
    defaults = optimizer.defaults
    if defaults.get("fused"):
        return "fused"
    return "foreach" if defaults.get("foreach") else "for_loop"
