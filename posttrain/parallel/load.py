"""Sharded loading: build on `meta`, parallelise, then read only this rank's slices.

    model = build_meta_model(args, backend).to(dtype)     # no memory
    apply_lora(model, ...)                                 # optional, still on meta
    parallelize_model(model, mesh, cfg.parallel, ...)      # TP, AC, compile, FSDP
    load_sharded(model, source, device)                    # each rank reads its own slices

`load_sharded` allocates the local shards (`to_empty`), then for every parameter asks which block
of the global tensor this rank owns (its DTensor placements on the mesh) and reads exactly that
block with safetensors' `get_slice`, applying the family key map and the vocabulary padding rule
of `posttrain.models.hf`. Each tensor is read through its own short-lived file mapping, so the
pages of the checkpoint a rank touched are released before the next tensor: no rank ever holds
the full model, in its own memory or in mapped file pages.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from posttrain.models.common.decoder import Decoder
from posttrain.models.hf import VOCAB_PARAMS, HFSource, checkpoint_index
from posttrain.models.lora import LoRALinear

WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")
LORA_PARAMS = ("lora_A", "lora_B")

# (our parameter name, global shape) -> the full initial tensor of a parameter the checkpoint does
# not hold (an adapter); must give the same tensor on every rank.
InitFn = Callable[[str, torch.Size], torch.Tensor]


def our_name(name: str) -> str:
    """A parameter name with wrapper prefixes (activation checkpointing, compile) removed."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def local_block(param: torch.Tensor) -> tuple[slice, ...]:
    """The block of the global tensor this rank holds: one slice per dimension.

    A DTensor's shard is one contiguous block for every placement FSDP2 and TP use (including
    FSDP over a tensor-parallel shard of the same dimension); a plain tensor is all of itself.
    """
    if isinstance(param, DTensor):
        shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
        return tuple(slice(o, o + n) for o, n in zip(offset, shape))
    return tuple(slice(0, n) for n in param.shape)


def local_tensor(param: torch.Tensor) -> torch.Tensor:
    """The tensor holding this rank's shard (the parameter itself when it is not distributed)."""
    return param.to_local() if isinstance(param, DTensor) else param


def is_distributed(model: nn.Module) -> bool:
    """True when any parameter is a DTensor (FSDP2 or TP applied)."""
    return any(isinstance(p, DTensor) for p in model.parameters())


def read_block(path: Path, hf_key: str, block: tuple[slice, ...], expected: torch.Size, name: str) -> torch.Tensor:
    """`block` of the tensor `hf_key` in `path`, reading nothing else.

    Vocabulary tables are padded to `expected[0]` rows with zeros (rows past the checkpoint's).
    """
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        view = handle.get_slice(hf_key)
        stored = tuple(view.get_shape())
        padded_rows = name in VOCAB_PARAMS and stored[0] <= expected[0]
        if stored != tuple(expected) and not (padded_rows and stored[1:] == tuple(expected[1:])):
            raise ValueError(
                f"checkpoint tensor for {name!r} has shape {stored}, the config implies {tuple(expected)}"
            )
        if not padded_rows or block[0].stop <= stored[0]:
            return view[block] if block else view[:]
        rows = block[0]
        out = torch.zeros([s.stop - s.start for s in block], dtype=_dtype_of(view))
        real = slice(rows.start, min(rows.stop, stored[0]))
        if real.stop > real.start:
            out[: real.stop - real.start] = view[(real, *block[1:])]
        return out


def _dtype_of(view) -> torch.dtype:
    names = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}
    return names[view.get_dtype()]


@torch.no_grad()
def load_sharded(
    model: Decoder,
    source: HFSource,
    device: torch.device | str = "cpu",
    *,
    init_missing: InitFn | None = None,
) -> Decoder:
    """Materialise a (parallelised) meta `model` on `device` from the checkpoint, shard by shard.

    Parameters the checkpoint lacks are created by `init_missing(name, shape)` (full tensor, the
    same on every rank; only this rank's block is kept); without it they are an error.
    The vocabulary tables are read first, while the rest is still unallocated memory, so the
    high-water mark stays at this rank's shards plus one table's slice.
    """
    model.to_empty(device=device)
    index = checkpoint_index(source)
    params = [(our_name(n), p) for n, p in model.named_parameters()]
    params.sort(key=lambda item: item[0] not in VOCAB_PARAMS)
    missing = []
    for name, param in params:
        block = local_block(param)
        if name in index:
            path, hf_key = index[name]
            chunk = read_block(path, hf_key, block, param.shape, name)
        elif init_missing is not None and name.rsplit(".", 1)[-1] in LORA_PARAMS:
            chunk = init_missing(name, param.shape)[block]
        else:
            missing.append(name)
            continue
        local_tensor(param).copy_(chunk)
        del chunk
    if missing:
        hf_names = [source.spec.key_map.to_hf(name) for name in missing]
        raise ValueError(f"checkpoint in {source.directory} lacks tensors: {', '.join(hf_names[:8])}")
    model.init_buffers(device)
    model.hf_source = source
    return model


def lora_initializer(model: nn.Module, seed: int) -> InitFn:
    """Initial LoRA weights that do not depend on the world size or the rank.

    `lora_A` is Kaiming-uniform (as `LoRALinear.reset_lora_parameters`) from one generator seeded
    with `seed` and advanced module by module in model order; `lora_B` is zero.
    """
    generator = torch.Generator().manual_seed(seed)
    tables: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            a = torch.empty(module.rank, module.in_features)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
            tables[f"{our_name(name)}.lora_A"] = a

    def init(name: str, shape: torch.Size) -> torch.Tensor:
        if name.endswith(".lora_B"):
            return torch.zeros(shape)
        return tables[name]

    return init


@torch.no_grad()
def init_lora_adapters(model: nn.Module, seed: int) -> None:
    """Re-initialise every adapter of a materialised model with `lora_initializer(seed)`."""
    init = lora_initializer(model, seed)
    for name, param in model.named_parameters():
        name = our_name(name)
        if name.rsplit(".", 1)[-1] in LORA_PARAMS:
            local_tensor(param).copy_(init(name, param.shape)[local_block(param)])
