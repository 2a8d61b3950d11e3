"""One no-grad pass of a frozen model over the training and held-out data, stored on disk.

What DPO's reference log-probs (`reference_cache.py`) and a distillation teacher's top-k table
(`teacher_cache.py`) are made by. The pass reads the training sources, then the held-out ones,
once each, in file order, rendered and packed exactly like training data; a `score(model, batch)`
function turns each batch into named tensors (rows along dim 0), stored under

    <run_dir>/<cache>/<fingerprint>/
        inputs.json                              what the fingerprint covers (readable)
        s<stream>-r<rank>-p<part>.safetensors    the scored rows of PART_BATCHES batches
        complete.json                            written last: the table is whole

The fingerprint hashes what the scores depend on: the sources (resolved path, size, mtime, how
they are read), the rendering settings, the tokenizer's and the frozen model's files (name, size,
mtime), its dtype, the training precision and whatever the caller adds. A rerun with the same
inputs reuses the table; any change computes a new one beside it. A pass killed midway resumes:
each rank writes a part every `PART_BATCHES` batches, and a restart skips the forward passes of the
parts every rank already has (the order is deterministic). Files are safetensors: nothing is
unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from posttrain.config.data import DataConfig, SourceConfig
from posttrain.config.loading import write_text_atomic
from posttrain.data.batch import PackedBatch
from posttrain.data.loader import build_loader
from posttrain.train.remote_teacher import RemoteTeacher
from posttrain.train.roles import FrozenModel
from posttrain.train.signals import StopFlag, StopRequested
from posttrain.train.step import autocast_context

COMPLETE_FILE = "complete.json"
INPUTS_FILE = "inputs.json"
PART_BATCHES = 16
RENDER_KEYS = ("task", "max_length", "train_on", "overlong", "special_tokens", "template_rewrite", "chat_template")

Score = Callable[[torch.nn.Module, PackedBatch], dict[str, torch.Tensor]]


def _files(directory: Path, keep: Callable[[str], bool]) -> list[list[Any]]:
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(directory.iterdir())
            if p.is_file() and keep(p.name)]


def _source_identity(source: SourceConfig) -> dict[str, Any]:
    path = Path(source.path).expanduser().resolve()
    stat = [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(path.rglob("*")) if p.is_file()] \
        if path.is_dir() else [path.stat().st_size, path.stat().st_mtime_ns]
    return {"path": str(path), "stat": stat,
            **source.model_dump(mode="json", include={"format", "split", "fields", "system_prompt", "dialogue", "rows"})}


def fingerprint_inputs(data: DataConfig, eval_sources: list[SourceConfig], *, tokenizer_dir: Path,
                       reference_dir: Path, reference_dtype: str, precision: str) -> dict[str, Any]:
    """Everything a frozen model's scores of the data depend on, as JSON-serialisable values."""
    return {
        "sources": [_source_identity(s) for s in data.sources],
        "eval_sources": [_source_identity(s) for s in eval_sources],
        "render": data.model_dump(mode="json", include=set(RENDER_KEYS)),
        "tokenizer": _files(tokenizer_dir, lambda name: not name.endswith((".safetensors", ".bin"))),
        "reference": {"dir": str(reference_dir.resolve()), "dtype": reference_dtype,
                      "files": _files(reference_dir, lambda name: name.endswith((".safetensors", ".json")))},
        "precision": precision,
    }


def fingerprint(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def stream_configs(data: DataConfig, eval_sources: list[SourceConfig]) -> Iterator[DataConfig]:
    """The pass's streams: the training sources, then the held-out ones, each once in file order."""
    for source in [*data.sources, *eval_sources]:  # one stream each: a mix of sources ends with its first
        yield data.model_copy(update={"sources": [source], "shuffle": False, "epochs": 1, "prefetch": 0})


class FrozenPass:
    """Computes (or finds) one table on this rank; collective over all ranks.

    `count_name` names the record count in complete.json (the rows of the first scored tensor).
    """

    cache: str = "frozen"
    count_name: str = "rows_scored"

    def __init__(self, run_dir: Path, inputs: dict[str, Any], *, rank: int, device: torch.device,
                 stop: StopFlag | None = None):
        self.directory = Path(run_dir) / self.cache / fingerprint(inputs)
        self.inputs, self.rank, self.device, self.stop = inputs, rank, device, stop

    @property
    def complete(self) -> bool:
        return (self.directory / COMPLETE_FILE).is_file()

    def parts(self) -> Iterator[dict[str, torch.Tensor]]:
        """Every rank's stored parts, in stream, rank and part order."""
        return load_parts(self.directory)

    def run(self, streams: list[DataConfig], frozen: Callable[[], FrozenModel | RemoteTeacher], score: Score, *,
            tokenizer, batch_size: int, dp_rank: int, dp_size: int, precision: str) -> None:
        """Run the pass over `streams` (each read once, in order) unless it is complete."""
        if self.rank == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            (self.directory / INPUTS_FILE).write_text(json.dumps(self.inputs, indent=2) + "\n")
        _barrier()
        role = frozen()
        records = 0
        try:
            for s, data in enumerate(streams):
                loader = build_loader(data, tokenizer, batch_size=batch_size, rank=dp_rank, world_size=dp_size)
                with loader:
                    records += self._stream(s, loader, role, score, precision)
        finally:
            role.close()
        del role
        totals = torch.tensor([records], dtype=torch.long, device=self.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(totals)
        if self.rank == 0:
            record = {self.count_name: int(totals.item()), "fingerprint": self.directory.name}
            write_text_atomic(self.directory / COMPLETE_FILE, json.dumps(record) + "\n")
        _barrier()

    def _stream(self, s: int, loader, role: FrozenModel, score: Score, precision: str) -> int:
        done = _agreed_min(self._parts_on_disk(s), self.device)
        pending: list[dict[str, torch.Tensor]] = []
        scored = 0
        with role.active() as model:
            for i, batch in enumerate(loader):
                if i // PART_BATCHES < done:
                    continue  # this part is on disk
                with autocast_context(precision, self.device.type):
                    pending.append({k: v.cpu() for k, v in score(model, batch.to(self.device)).items()})
                if (i + 1) % PART_BATCHES == 0:
                    scored += self._write_part(s, i // PART_BATCHES, pending)
                    pending = []
                    self._check_stop()
            if pending:
                scored += self._write_part(s, i // PART_BATCHES, pending)
        return scored

    def _parts_on_disk(self, s: int) -> int:
        count = 0
        while (self.directory / _part_name(s, self.rank, count)).is_file():
            count += 1
        return count

    def _write_part(self, s: int, part: int, pending: list[dict[str, torch.Tensor]]) -> int:
        tensors = {key: torch.cat([p[key] for p in pending]).contiguous() for key in pending[0]}
        final = self.directory / _part_name(s, self.rank, part)
        tmp = final.with_suffix(".tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, final)
        return len(next(iter(tensors.values())))

    def _check_stop(self) -> None:
        if self.stop is not None and self.stop.should_stop(self.device):
            raise StopRequested(self.stop.signal_name)


def load_parts(directory: Path) -> Iterator[dict[str, torch.Tensor]]:
    """The parts stored in `directory`, in stream, rank and part order."""
    for part in sorted(Path(directory).glob("s*-r*-p*.safetensors")):
        yield load_file(part)


def _part_name(s: int, rank: int, part: int) -> str:
    return f"s{s}-r{rank:05d}-p{part:06d}.safetensors"


def _agreed_min(value: int, device: torch.device) -> int:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    flag = torch.tensor([value], dtype=torch.long, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return int(flag.item())


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
