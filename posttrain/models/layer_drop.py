"""A shallower student from a teacher: a subset of its layers, its embeddings, final norm and head.

    student = drop_layers(teacher, [0, 2, 4, ...])          # a Decoder of the same family
    init_student(teacher_dir, [0, 2, 4, ...], out_dir)       # the same, written as an HF directory

This is how small production students are usually started (DistilBERT's every-other-layer
initialisation, layer-pruned Llama/Minitron students): the student keeps the teacher's
vocabulary, width and every per-layer setting (a Gemma 3 sliding layer stays sliding), so it
starts close to the teacher and loads anywhere the teacher does.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch

from posttrain.models.common.decoder import Decoder
from posttrain.models.hf import build_meta_model, load_hf, read_hf_config, save_hf

RECORD_FILE = "student_init.json"
_LAYER = re.compile(r"^layers\.(\d+)\.(.*)$")


def check_layers(layers: Sequence[int], num_layers: int) -> list[int]:
    """`layers` as a list: non-empty, strictly increasing, each in `[0, num_layers)`."""
    layers = list(layers)
    if not layers:
        raise ValueError("layers is empty; name the teacher layers the student keeps, e.g. [0, 2, 4]")
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"layer {bad[0]} does not exist: the teacher has layers 0..{num_layers - 1}")
    if any(b <= a for a, b in zip(layers, layers[1:])):
        raise ValueError(f"layers must be strictly increasing (the student keeps the teacher's order), got {layers}")
    return layers


def drop_layers(model: Decoder, layers: Sequence[int]) -> Decoder:
    """A new decoder holding copies of `model`'s `layers` (in order) and all its other weights."""
    layers = check_layers(layers, model.args.num_layers)
    args = dataclasses.replace(model.args, num_layers=len(layers),
                               layer_types=[model.args.layer_types[i] for i in layers])
    position = {old: new for new, old in enumerate(layers)}
    state = {}
    for name, tensor in model.state_dict().items():
        match = _LAYER.match(name)
        if match is None:
            state[name] = tensor.clone()
        elif int(match[1]) in position:
            state[f"layers.{position[int(match[1])]}.{match[2]}"] = tensor.clone()
    device = model.tok_embeddings.weight.device
    student = build_meta_model(args, model.attention_backend)
    student.to_empty(device=device)
    student.load_state_dict(state, strict=True)
    student.init_buffers(device)
    student.hf_source = model.hf_source
    return student


def init_student(teacher_dir: str | Path, layers: Sequence[int], out_dir: str | Path) -> Path:
    """Write the student of `teacher_dir` keeping `layers` to `out_dir` (an HF directory).

    Idempotent: an existing student made from the same teacher files and layers is reused; one
    made from anything else is an error naming the difference. The directory is written under a
    temporary name and renamed, so an interrupted write is redone.
    """
    teacher_dir, out = Path(teacher_dir), Path(out_dir)
    record = {"teacher": str(teacher_dir.resolve()), "layers": list(layers), "files": _weight_files(teacher_dir)}
    if (out / RECORD_FILE).is_file():
        existing = json.loads((out / RECORD_FILE).read_text())
        if existing != record:
            raise ValueError(f"{out} holds a student made from {existing['teacher']} with layers "
                             f"{existing['layers']}, not from {record['teacher']} with layers {record['layers']} "
                             "(or the teacher's files changed); remove it or use another run name")
        return out
    check_layers(layers, read_hf_config(teacher_dir)[1].num_layers)  # before any weight is read
    teacher = load_hf(teacher_dir, dtype=torch.float32)
    student = drop_layers(teacher, layers)
    del teacher
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_hf(student, tmp, tokenizer_dir=teacher_dir)
        (tmp / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
        shutil.rmtree(out, ignore_errors=True)  # an incomplete earlier attempt has no record
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _weight_files(directory: Path) -> list[list]:
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(directory.iterdir())
            if p.is_file() and p.name.endswith((".safetensors", ".json"))]
