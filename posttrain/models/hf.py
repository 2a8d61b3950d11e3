"""Hugging Face bridge: build our decoder from an HF directory and write one back.

`load_hf(dir)` reads `config.json`, picks the family spec by `model_type`, builds the model on the
`meta` device and materialises it one checkpoint tensor at a time (single `model.safetensors` or a
sharded `*.safetensors.index.json`), so no full-size random init ever happens. The pieces are
public for per-rank sharded loading: `read_hf_config`, `build_meta_model`, `iter_hf_tensors`.

`save_hf(model, dir)` writes `config.json` (the source config updated with our fields), the
weights with the vocabulary padding stripped, and the tokenizer files, in a layout
`transformers.AutoModelForCausalLM` loads. Only safetensors are read or written.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from posttrain.models.common.config import ModelArgs
from posttrain.models.common.decoder import Decoder
from posttrain.models.common.spec import ModelSpec
from posttrain.models.registry import spec_for_model_type

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
VOCAB_PARAMS = ("tok_embeddings.weight", "output.weight")  # rows padded to a multiple of 64
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
DEFAULT_SHARD_BYTES = 5 * 1024**3


@dataclass(frozen=True)
class HFSource:
    """What a model was loaded from: directory, raw config.json, its model_type and family spec."""

    directory: Path
    config: dict[str, Any]
    model_type: str
    spec: ModelSpec


def read_hf_config(model_dir: str | Path) -> tuple[HFSource, ModelArgs]:
    """Parse `model_dir/config.json` into its family spec and our `ModelArgs`."""
    model_dir = Path(model_dir)
    path = model_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; expected a Hugging Face model directory")
    config = json.loads(path.read_text())
    model_type = config.get("model_type")
    spec = spec_for_model_type(model_type)
    source = HFSource(directory=model_dir, config=config, model_type=model_type, spec=spec)
    return source, spec.args_from_hf(config)


def checkpoint_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint: the shards named by the index, or the single file."""
    model_dir = Path(model_dir)
    index = model_dir / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [model_dir / name for name in sorted(set(weight_map.values()))]
    single = model_dir / SINGLE_FILE
    if single.is_file():
        return [single]
    raise FileNotFoundError(
        f"no {SINGLE_FILE} or {INDEX_FILE} in {model_dir}; only safetensors checkpoints are read "
        "(convert .bin/.pt checkpoints to safetensors first)"
    )


def checkpoint_index(source: HFSource) -> dict[str, tuple[Path, str]]:
    """Our parameter name -> (safetensors file, checkpoint key), from the files' headers only."""
    index: dict[str, tuple[Path, str]] = {}
    for path in checkpoint_files(source.directory):
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            for hf_key in handle.keys():
                try:
                    ours = source.spec.key_map.from_hf(hf_key)
                except KeyError:
                    raise ValueError(
                        f"{path.name}: unexpected tensor {hf_key!r} for a {source.spec.family} model"
                    ) from None
                if ours is not None:
                    index[ours] = (path, hf_key)
    return index


def iter_hf_tensors(source: HFSource) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(our_name, tensor)` for every checkpoint tensor we use, one at a time, on CPU."""
    by_file: dict[Path, list[tuple[str, str]]] = {}
    for ours, (path, hf_key) in checkpoint_index(source).items():
        by_file.setdefault(path, []).append((ours, hf_key))
    for path, entries in by_file.items():
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            for ours, hf_key in entries:
                yield ours, handle.get_tensor(hf_key)


def build_meta_model(args: ModelArgs, attention_backend: str = "sdpa") -> Decoder:
    """The decoder with every parameter on the `meta` device (no memory, no init)."""
    with torch.device("meta"):
        return Decoder(args, attention_backend)


def load_hf(
    model_dir: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    attention_backend: str = "sdpa",
) -> Decoder:
    """Load an HF causal-LM directory into our decoder on `device` in `dtype`."""
    source, args = read_hf_config(model_dir)
    model = build_meta_model(args, attention_backend)
    params = dict(model.named_parameters())
    for name, tensor in iter_hf_tensors(source):
        if name == "output.weight" and args.tie_embeddings:
            continue  # some tied checkpoints store the head too; the embedding is authoritative
        if name not in params:
            raise ValueError(
                f"checkpoint tensor for {name!r} has no place in this {source.spec.family} config"
            )
        tensor = tensor.to(device=device, dtype=dtype)
        if name in VOCAB_PARAMS:
            tensor = _pad_rows(tensor, args.padded_vocab_size)
        if tensor.shape != params[name].shape:
            raise ValueError(
                f"checkpoint tensor for {name!r} has shape {tuple(tensor.shape)}, "
                "the config implies "
                f"{tuple(params[name].shape)}"
            )
        _assign(model, name, tensor)
    missing = [name for name, p in model.named_parameters() if p.is_meta]
    if missing:
        hf_names = [source.spec.key_map.to_hf(name) for name in missing]
        raise ValueError(
            f"checkpoint in {source.directory} lacks tensors: {', '.join(hf_names[:8])}"
        )
    model.init_buffers(device)
    model.hf_source = source
    return model


def _pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    if tensor.shape[0] == rows:
        return tensor
    padded = tensor.new_zeros((rows, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    return padded


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_path, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_path)
    setattr(module, leaf, nn.Parameter(tensor, requires_grad=getattr(module, leaf).requires_grad))


def hf_state_dict(model: Decoder, spec: ModelSpec) -> dict[str, torch.Tensor]:
    """Our weights under checkpoint names, vocabulary padding stripped, contiguous, on CPU."""
    out = {}
    for name, tensor in model.state_dict().items():
        if name in VOCAB_PARAMS:
            tensor = tensor[: model.vocab_size]
        out[spec.key_map.to_hf(name)] = tensor.detach().to("cpu").contiguous()
    return out


def save_hf(
    model: Decoder,
    out_dir: str | Path,
    tokenizer_dir: str | Path | None = None,
    model_type: str | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """Write `model` as an HF directory; returns `out_dir`.

    `model_type` defaults to the one the model was loaded with (required for models built from
    scratch). Tokenizer files are copied from `tokenizer_dir`, else from the source directory.
    Weights above `max_shard_bytes` are split into shards with an index, as transformers does.
    """
    source: HFSource | None = model.hf_source
    model_type = model_type or (source.model_type if source else None)
    if model_type is None:
        raise ValueError("save_hf needs model_type= for a model that was not loaded with load_hf")
    spec = spec_for_model_type(model_type)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("model*.safetensors"), out / INDEX_FILE]:
        stale.unlink(missing_ok=True)

    tensors = hf_state_dict(model, spec)
    _write_weights(tensors, out, max_shard_bytes)
    (out / "config.json").write_text(
        json.dumps(_hf_config(model, spec, model_type, source), indent=2, sort_keys=True) + "\n"
    )

    tok_src = (
        Path(tokenizer_dir) if tokenizer_dir is not None else (source.directory if source else None)
    )
    if tok_src is not None and tok_src.resolve() != out.resolve():
        for name in TOKENIZER_FILES:
            if (tok_src / name).is_file():
                shutil.copy2(tok_src / name, out / name)
    return out


def _hf_config(
    model: Decoder, spec: ModelSpec, model_type: str, source: HFSource | None
) -> dict[str, Any]:
    config = dict(source.config) if source and source.model_type == model_type else {}
    config.update(spec.args_to_hf(model.args, model_type))
    config["architectures"] = [spec.architectures[model_type]]
    dtype = str(model.tok_embeddings.weight.dtype).removeprefix("torch.")
    config["dtype"] = dtype
    if "torch_dtype" in config:
        config["torch_dtype"] = dtype
    return config


def _write_weights(tensors: dict[str, torch.Tensor], out: Path, max_shard_bytes: int) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(out / SINGLE_FILE), metadata=metadata)
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        filename = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / filename), metadata=metadata)
        weight_map.update(dict.fromkeys(shard, filename))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
