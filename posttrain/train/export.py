"""`export/`: the trained policy as a Hugging Face directory (and a PEFT adapter under LoRA).

The export is written under `<run>/.tmp-export`, gets a `SHA256SUMS` file (`sha256sum -c
SHA256SUMS` inside the directory checks it; `verify_sums` does the same) and is then renamed to
`<run>/export`, so an interrupted export never leaves a directory that looks finished.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch.distributed as dist
import torch.nn as nn

from posttrain.config import LoraConfig
from posttrain.models.hf import save_hf
from posttrain.models.lora import merge_lora, save_peft_adapter
from posttrain.parallel.export import gather_lora_adapters, save_hf_sharded
from posttrain.parallel.load import is_distributed
from posttrain.train.checkpoint_io import sha256_file

WRAPPER_PREFIX = "_checkpoint_wrapped_module."
EXPORT_DIR = "export"
SUMS_FILE = "SHA256SUMS"


def _our_name(name: str) -> str:
    return name.replace(WRAPPER_PREFIX, "")


def export_model(lora: LoraConfig, model: nn.Module, model_dir: Path, out: Path) -> Path:
    """The merged model as an HF directory at `out`; with LoRA also `out/adapter/` (PEFT).

    A sharded model is gathered tensor by tensor: every rank calls this, rank 0 writes. A
    single-device LoRA model is merged in place (the run is over when this is called).
    """
    sharded = is_distributed(model)
    if lora.enabled:
        from posttrain.models.registry import spec_for_model_type

        spec = spec_for_model_type(model.hf_source.model_type)
        adapters = gather_lora_adapters(model) if sharded else model
        if not sharded or dist.get_rank() == 0:
            save_peft_adapter(
                adapters,
                out / "adapter",
                to_hf_name=lambda name: spec.key_map.to_hf(_our_name(name)),
                base_model_path=str(model_dir),
                rank=lora.rank,
                alpha=lora.alpha,
                dropout=lora.dropout,
            )
    if sharded:
        return save_hf_sharded(model, out, tokenizer_dir=model_dir)  # merges LoRA tensor by tensor
    if lora.enabled:
        merge_lora(model)
    save_hf(model, out, tokenizer_dir=model_dir)
    return out


def export_run(lora: LoraConfig, model: nn.Module, model_dir: Path, run_dir: Path, *, main: bool) -> Path:
    """`export_model` into `run_dir/.tmp-export`, then (`main` rank) `SHA256SUMS` and the rename
    to `run_dir/export`, replacing an earlier export. Every rank of a sharded model calls it."""
    final, tmp = run_dir / EXPORT_DIR, run_dir / f".tmp-{EXPORT_DIR}"
    if main and tmp.exists():
        shutil.rmtree(tmp)
    export_model(lora, model, model_dir, tmp)
    if main:
        write_sums(tmp)
        old = run_dir / f".tmp-old-{EXPORT_DIR}"
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    return final


def _files(directory: Path) -> list[str]:
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*")
                  if p.is_file() and p.name != SUMS_FILE)


def write_sums(directory: Path) -> Path:
    """`SHA256SUMS` in the format of `sha256sum`: one `<hex>  <relative path>` line per file."""
    lines = [f"{sha256_file(directory / name)}  {name}\n" for name in _files(directory)]
    path = directory / SUMS_FILE
    path.write_text("".join(lines))
    return path


def verify_sums(directory: str | Path) -> list[str]:
    """What differs from `SHA256SUMS` (empty when every file matches and none is missing or extra)."""
    directory = Path(directory)
    sums_path = directory / SUMS_FILE
    if not sums_path.is_file():
        return [f"{sums_path}: missing"]
    listed = dict(reversed(line.split("  ", 1)) for line in sums_path.read_text().splitlines() if line)
    present = set(_files(directory))
    problems = [f"{name}: missing" for name in sorted(set(listed) - present)]
    problems += [f"{name}: not listed in {SUMS_FILE}" for name in sorted(present - set(listed))]
    problems += [f"{name}: sha256 mismatch" for name in sorted(set(listed) & present)
                 if sha256_file(directory / name) != listed[name]]
    return problems
