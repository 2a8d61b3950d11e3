"""Export a sharded (FSDP2 / TP) model as a Hugging Face directory, or stream its HF-named tensors
to a generation engine, without a full copy anywhere.

Every rank walks the parameters in the same order and gathers one tensor at a time
(`full_tensor()`, a collective); rank 0 appends its bytes to a safetensors file whose header was
written up front from the global shapes, then drops it. LoRA adapters are folded into their base
weight tensor by tensor, exactly as `LoRALinear.merged_linear` does. File layout (shards by
`max_shard_bytes`, index), `config.json` and tokenizer files follow `posttrain.models.hf.save_hf`.
`iter_hf_tensors_for_sync` yields the same tensors under their HF names instead of writing them.
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import DTensor

from posttrain.models.hf import (
    DEFAULT_SHARD_BYTES,
    INDEX_FILE,
    SINGLE_FILE,
    TOKENIZER_FILES,
    VOCAB_PARAMS,
    _hf_config,
)
from posttrain.models.common.spec import ModelSpec
from posttrain.models.lora import LoRALinear
from posttrain.models.registry import spec_for_model_type
from posttrain.parallel.fsdp import reshard
from posttrain.parallel.load import LORA_PARAMS, our_name

SAFETENSORS_DTYPES = {
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.float64: "F64",
}


@dataclass(frozen=True)
class ExportTensor:
    """One tensor of the export: our name, its exported shape and dtype, and how to gather it
    (collective: every rank must call `gather` in the same order)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    gather: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        numel = 1
        for n in self.shape:
            numel *= n
        return numel * torch.empty((), dtype=self.dtype).element_size()


def full(param: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every rank (a collective for a DTensor)."""
    return param.full_tensor() if isinstance(param, DTensor) else param.detach()


def export_tensors(model: nn.Module) -> list[ExportTensor]:
    """The model's tensors as they are exported: LoRA merged, vocabulary padding stripped."""
    modules = {our_name(name): m for name, m in model.named_modules()}
    vocab = model.vocab_size
    out = []
    for raw_name, param in model.named_parameters():
        name = our_name(raw_name)
        owner_name, _, leaf = name.rpartition(".")
        owner = modules.get(owner_name)
        if isinstance(owner, LoRALinear) and leaf in LORA_PARAMS:
            continue
        shape = tuple(param.shape)
        if isinstance(owner, LoRALinear) and leaf == "weight":
            gather = _merged_gather(owner)
        elif name in VOCAB_PARAMS:
            shape = (vocab, *shape[1:])
            gather = _trimmed_gather(param, vocab)
        else:
            gather = _plain_gather(param)
        out.append(ExportTensor(name, shape, param.dtype, gather))
    return out


def _plain_gather(param: torch.Tensor) -> Callable[[], torch.Tensor]:
    return lambda: full(param)


def _trimmed_gather(param: torch.Tensor, rows: int) -> Callable[[], torch.Tensor]:
    return lambda: full(param)[:rows]


def _merged_gather(module: LoRALinear) -> Callable[[], torch.Tensor]:
    def gather() -> torch.Tensor:
        weight = full(module.weight)
        delta = (full(module.lora_B).float() @ full(module.lora_A).float()) * module.scaling
        return (weight.float() + delta).to(weight.dtype)

    return gather


def gather_lora_adapters(model: nn.Module) -> nn.Module:
    """A plain module tree holding every adapter whole, under the model's names (collective).

    It is what `save_peft_adapter` reads; the base weights are left on `meta`.
    """
    root = nn.Module()
    for raw_name, module in model.named_modules():
        if not isinstance(module, LoRALinear):
            continue
        base = nn.Linear(module.in_features, module.out_features, bias=False, device="meta")
        copy = LoRALinear(base, module.rank, module.alpha)
        copy.lora_A = nn.Parameter(full(module.lora_A).clone(), requires_grad=False)
        copy.lora_B = nn.Parameter(full(module.lora_B).clone(), requires_grad=False)
        _place(root, our_name(raw_name), copy)
    return root


def _place(root: nn.Module, path: str, module: nn.Module) -> None:
    parent = root
    *parents, leaf = path.split(".")
    for part in parents:
        if not hasattr(parent, part):
            parent.add_module(part, nn.Module())
        parent = getattr(parent, part)
    parent.add_module(leaf, module)


def iter_hf_tensors_for_sync(
    model: nn.Module, spec: ModelSpec | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(hf_name, full tensor)` for every exported weight, one at a time: the trainer's side
    of `GenerationEngine.update_weights`.

    The model may be plain, carry LoRA adapters (merged tensor by tensor) or be FSDP2/TP-sharded;
    tensors come in the model's own dtype with the vocabulary padding stripped, as `save_hf`
    writes them. On a sharded model each tensor is gathered by a collective, so every rank must
    run the iterator to its end in the same order (ranks without an engine just drain it); at
    most one gathered tensor exists at a time if the consumer keeps no reference to it. On a
    plain model, unadapted tensors are the live parameters themselves (detached, not copied).
    `spec` defaults to the family the model was loaded with.
    """
    if spec is None:
        if model.hf_source is None:
            raise ValueError("iter_hf_tensors_for_sync needs spec= for a model not loaded from a Hugging Face directory")
        spec = model.hf_source.spec
    reshard(model)
    for t in export_tensors(model):
        yield spec.key_map.to_hf(t.name), t.gather()


def plan_files(tensors: list[ExportTensor], max_shard_bytes: int) -> list[list[ExportTensor]]:
    """Split into files the way `save_hf` does: a new file when the next tensor would overflow."""
    files: list[list[ExportTensor]] = [[]]
    size = 0
    for t in tensors:
        if files[-1] and size + t.nbytes > max_shard_bytes:
            files.append([])
            size = 0
        files[-1].append(t)
        size += t.nbytes
    return files


def write_safetensors_stream(
    path: Path, entries: list[tuple[str, ExportTensor]], tensors: Iterator[torch.Tensor] | None
) -> None:
    """Write a safetensors file whose header comes from `entries` (stored name, tensor) and whose
    data comes from `tensors`, one at a time. With `tensors=None` (ranks other than 0) nothing
    is written, but each `gather` is still called so the collectives line up."""
    if tensors is None:
        for _, t in entries:
            t.gather()
        return
    header: dict[str, dict] = {"__metadata__": {"format": "pt"}}  # type: ignore[dict-item]
    offset = 0
    for stored, t in entries:
        if t.dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"cannot export {t.name} of dtype {t.dtype}")
        header[stored] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                          "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for (stored, t), tensor in zip(entries, tensors, strict=True):
            if tuple(tensor.shape) != t.shape or tensor.dtype != t.dtype:
                raise AssertionError(f"{stored}: gathered {tuple(tensor.shape)} {tensor.dtype}, expected {t.shape} {t.dtype}")
            f.write(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().data)


def save_hf_sharded(
    model: nn.Module,
    out_dir: str | Path,
    tokenizer_dir: str | Path | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """Write a sharded `model` (loaded by `load_sharded`) as an HF directory; collective.

    Rank 0 writes; peak memory on any rank is its shards plus one gathered tensor.
    """
    source = model.hf_source
    if source is None:
        raise ValueError("save_hf_sharded needs a model loaded from a Hugging Face directory")
    spec = spec_for_model_type(source.model_type)
    rank = dist.get_rank() if dist.is_initialized() else 0
    out = Path(out_dir)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        for stale in [*out.glob("model*.safetensors"), out / INDEX_FILE]:
            stale.unlink(missing_ok=True)
    reshard(model)
    files = plan_files(export_tensors(model), max_shard_bytes)
    names = [SINGLE_FILE] if len(files) == 1 else [
        f"model-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, len(files) + 1)
    ]
    weight_map = {}
    for filename, group in zip(names, files):
        entries = [(spec.key_map.to_hf(t.name), t) for t in group]
        stream = (t.gather() for _, t in entries) if rank == 0 else None
        write_safetensors_stream(out / filename, entries, stream)
        weight_map.update(dict.fromkeys((stored for stored, _ in entries), filename))
    if rank == 0:
        if len(files) > 1:
            total = sum(t.nbytes for group in files for t in group)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (out / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        config = _hf_config(model, spec, source.model_type, source)
        (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        tok_src = Path(tokenizer_dir) if tokenizer_dir is not None else source.directory
        if tok_src.resolve() != out.resolve():
            for name in TOKENIZER_FILES:
                if (tok_src / name).is_file():
                    shutil.copy2(tok_src / name, out / name)
    if dist.is_initialized():
        dist.barrier()
    return out
