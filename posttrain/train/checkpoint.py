"""Checkpoints with `torch.distributed.checkpoint` (DCP): save, keep the last K, find, resume.

Layout under the run directory::

    checkpoints/
      step_200/            a complete checkpoint
        .metadata          DCP index
        __0_0.distcp ...   DCP shards: model, optimiser, scheduler, counters (same on all ranks)
        rank_0.pt ...      per-rank state: data-loader position and RNG states (differ by rank)
        meta.json          step, time, world size, plus what the caller passes (tokens, config hash)
      .tmp-step_300/       a save in progress (or one a crash interrupted): never loaded
      latest               text file naming the newest checkpoint ("step_200")

A checkpoint is written under `.tmp-step_N` and renamed to `step_N` only once every rank's files
and `meta.json` are there, so a directory named `step_N` is always complete. `meta.json` holds a
checksum manifest of every other file (`manifest`: size and sha256), written before the rename;
`verify_checkpoint` checks it. `latest` is replaced atomically after the rename. Pruning renames a
checkpoint to `.tmp-pruned-step_N` before deleting it, so a crash mid-prune never leaves a
half-deleted `step_N`. Works in a process group of any size (ranks must share the filesystem) and
with no process group at all. Files are read without trusting them (see `checkpoint_io`).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.stateful import Stateful

from posttrain.train.checkpoint_io import (
    MANIFEST_KEY,
    META_FILE,
    CheckpointError,
    SafeFileSystemReader,
    SafeLoadPlanner,
    describe_write_error,
    first_failure,
    file_digests,
    free_bytes,
    load_rank_file,
    read_meta,
)

CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"
TMP_PREFIX = ".tmp-"
_STEP_DIR = re.compile(r"^step_(\d+)$")


class StatefulObject(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


# ----------------------------------------------------------------------------- RNG


def get_rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU and (when initialised) CUDA generator states of this process."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": _numpy_state_to_plain(np.random.get_state()),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _numpy_state_to_plain(state: tuple) -> tuple:
    """NumPy's legacy RNG state with its key array as a tensor, so `weights_only` loading works."""
    name, keys, pos, has_gauss, cached = state
    return (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))


def _numpy_state_from_plain(state: tuple) -> tuple:
    name, keys, pos, has_gauss, cached = state
    return (name, keys.numpy().astype(np.uint32), pos, has_gauss, cached)


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(_numpy_state_from_plain(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- application state


class AppState(Stateful):
    """Everything a resumed run needs, as one DCP `Stateful`.

    DCP stores `state_dict()`: the model and optimiser (through `get_model_state_dict` /
    `get_optimizer_state_dict`, so FSDP2 / DTensor shards work unchanged), the scheduler and
    `counters`. Rank-local state (the loader's position, RNG states) goes through
    `rank_state_dict()` into a file per rank, because DCP keeps one copy of non-tensor values.

    `counters` is a plain dict the training loop updates in place (e.g. `step`, `tokens`,
    `trained_tokens`); loading replaces its contents. With `include_frozen=False` frozen
    parameters (the base model under LoRA) are not saved, and loading leaves them as they are.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: StatefulObject | None = None,
        loader: StatefulObject | None = None,
        counters: dict[str, Any] | None = None,
        *,
        include_frozen: bool = True,
    ):
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.loader = loader
        self.counters: dict[str, Any] = counters if counters is not None else {"step": 0}
        self.include_frozen = include_frozen

    def _options(self) -> StateDictOptions:
        return StateDictOptions(
            ignore_frozen_params=not self.include_frozen, strict=self.include_frozen
        )

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "model": get_model_state_dict(self.model, options=self._options()),
            "counters": dict(self.counters),
        }
        if self.optimizer is not None:
            state["optimizer"] = get_optimizer_state_dict(
                self.model, self.optimizer, options=self._options()
            )
        if self.scheduler is not None:
            state["scheduler"] = self.scheduler.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_model_state_dict(self.model, state["model"], options=self._options())
        if self.optimizer is not None:
            set_optimizer_state_dict(
                self.model, self.optimizer, state["optimizer"], options=self._options()
            )
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.counters.clear()
        self.counters.update(state["counters"])

    def rank_state_dict(self) -> dict[str, Any]:
        return {
            "loader": self.loader.state_dict() if self.loader is not None else None,
            "rng": get_rng_state(),
        }

    def load_rank_state_dict(self, state: dict[str, Any], *, restore_rng: bool = True) -> None:
        if self.loader is not None:
            if state.get("loader") is None:
                raise ValueError("the checkpoint holds no data-loader state to resume from")
            self.loader.load_state_dict(state["loader"])
        if restore_rng:
            set_rng_state(state["rng"])


# ----------------------------------------------------------------------------- helpers


def _rank_world() -> tuple[int, int, bool]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), True
    return 0, 1, False


def _barrier(distributed: bool) -> None:
    if distributed:
        dist.barrier()


@contextmanager
def _single_process_quiet(distributed: bool) -> Iterator[None]:
    """Silence DCP's 'assuming a single process' warning when there is no process group."""
    with warnings.catch_warnings():
        if not distributed:
            warnings.filterwarnings("ignore", message=".*single process.*")
        yield


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rank_file(checkpoint: Path, rank: int) -> Path:
    return Path(checkpoint) / f"rank_{rank}.pt"


def is_complete(path: str | Path) -> bool:
    """A finished checkpoint: named `step_N`, with DCP metadata and `meta.json`."""
    path = Path(path)
    return (
        _STEP_DIR.match(path.name) is not None
        and (path / ".metadata").is_file()
        and (path / META_FILE).is_file()
    )


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest step first (temporary directories ignored)."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and is_complete(p)]
    return sorted(found, key=lambda p: int(p.name.removeprefix("step_")))


# ----------------------------------------------------------------------------- save


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    app_state: AppState,
    meta: dict[str, Any] | None = None,
    *,
    keep_last: int | None = None,
) -> Path:
    """Save `app_state` as `run_dir/checkpoints/step_{step}` and return that path.

    Collective: every rank calls it. `meta` (JSON-serialisable, e.g. `{"tokens": ...,
    "config_hash": ...}`) is written to `meta.json` with `step`, `time`, `saved_at`,
    `world_size` and the checksum `manifest` of the other files. Saving a step that already
    exists replaces it. With `keep_last=K`, K checkpoints stay: this one and the newest others by
    step (see `prune_checkpoints`). A failed write (a full disk) raises `CheckpointError` naming
    the cause and the newest complete checkpoint, which is left as it was.
    """
    rank, world_size, distributed = _rank_world()
    root = Path(run_dir) / CHECKPOINTS_DIR
    final = root / f"step_{step}"
    tmp = root / f"{TMP_PREFIX}step_{step}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    _barrier(distributed)
    try:
        with _single_process_quiet(distributed):
            dcp.save({"app": app_state}, checkpoint_id=tmp, no_dist=not distributed)
        with open(rank_file(tmp, rank), "wb") as f:
            torch.save(app_state.rank_state_dict(), f)
            f.flush()
            os.fsync(f.fileno())
        _barrier(distributed)
        if rank == 0:
            record = {**(meta or {}), "step": step, "world_size": world_size}
            _complete(tmp, final, record)
    except (OSError, RuntimeError, CheckpointException) as err:
        raise _write_failed(first_failure(err), run_dir, tmp) from None
    if rank == 0 and keep_last is not None:
        prune_checkpoints(run_dir, keep_last, keep=final)
    _barrier(distributed)
    return final


def _complete(tmp: Path, final: Path, record: dict[str, Any]) -> None:
    """Write `meta.json` (with the checksum manifest) into `tmp`, rename it to `final`, point
    `latest` at it. Rank 0 only, after every rank's files are written."""
    now = time.time()
    record = {**record, "time": now, "saved_at": datetime.fromtimestamp(now, timezone.utc).isoformat(),
              MANIFEST_KEY: file_digests(tmp)}
    _write_atomic(tmp / META_FILE, (json.dumps(record, indent=2) + "\n").encode())
    root = final.parent
    if final.exists():  # re-saving a step (e.g. after resuming from an earlier one)
        old = root / f"{TMP_PREFIX}old-{final.name}"
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)
    _write_atomic(root / LATEST_FILE, (final.name + "\n").encode())


def _write_failed(err: BaseException, run_dir: str | Path, tmp: Path) -> CheckpointError:
    """The error for a failed save; the partial directory is removed (it would never be loaded)."""
    cause = describe_write_error(err, tmp.parent, free_bytes(tmp.parent))
    shutil.rmtree(tmp, ignore_errors=True)
    newest = latest_checkpoint(run_dir)
    kept = f"the newest complete checkpoint is still {newest}" if newest else "no complete checkpoint exists yet"
    return CheckpointError(f"writing checkpoint {tmp.name.removeprefix(TMP_PREFIX)} failed: {cause}; {kept}")


def prune_checkpoints(run_dir: str | Path, keep_last: int, keep: Path | None = None) -> list[Path]:
    """Keep `keep_last` complete checkpoints, delete the rest and any leftovers of a crash.

    Kept: `keep` (the one just written) and the newest others by step. Leftovers are temporary
    directories and `step_N` directories that are not complete (a crash in the middle of an
    older version's pruning). A checkpoint is renamed to a temporary name before it is deleted,
    so a crash here leaves only temporary directories. Returns the deleted checkpoint paths. Call
    on one rank only.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    checkpoints = list_checkpoints(run_dir)
    if keep is not None:
        kept = Path(keep).resolve()
        others = [p for p in checkpoints if p.resolve() != kept]
        doomed = others[: max(0, len(others) - (keep_last - 1))]
    else:
        doomed = checkpoints[:-keep_last]
    root = Path(run_dir) / CHECKPOINTS_DIR
    incomplete = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name) and not is_complete(p)]
    for path in doomed + incomplete:
        trash = root / f"{TMP_PREFIX}pruned-{path.name}"
        if trash.exists():
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(path, trash)
    for stale in root.glob(f"{TMP_PREFIX}*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
    return doomed


# ----------------------------------------------------------------------------- find and load


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint `latest` names if it is complete, else the complete one with the highest
    step, else None."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    pointer = root / LATEST_FILE
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if is_complete(named):
            return named
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1] if checkpoints else None


def resume_candidates(run_dir: str | Path, resume: str) -> list[Path]:
    """The checkpoints `checkpoint.resume` allows, preferred first.

    `never`: none. `auto`: the complete checkpoints of `run_dir`, the one `latest` names first,
    then the others by descending step. A path to a checkpoint (`.../step_N`): only that one. A
    run directory or its `checkpoints/` directory: its complete checkpoints as for `auto`. Raises
    ValueError when a given path holds no complete checkpoint.
    """
    if resume == "never":
        return []
    if resume == "auto":
        return _newest_first(Path(run_dir))
    path = Path(resume).expanduser()
    if is_complete(path):
        return [path]
    if not path.exists():
        raise ValueError(f"checkpoint.resume: {resume!r} does not exist")
    found = _newest_first(path.parent if path.name == CHECKPOINTS_DIR else path)
    if not found:
        raise ValueError(
            f"checkpoint.resume: {resume!r} is neither a complete checkpoint (step_N with "
            f"{META_FILE}) nor a run directory holding one"
        )
    return found


def _newest_first(run_dir: Path) -> list[Path]:
    checkpoints = list_checkpoints(run_dir)[::-1]
    latest = latest_checkpoint(run_dir)
    return ([latest] if latest else []) + [p for p in checkpoints if p != latest]


def find_resume_checkpoint(run_dir: str | Path, resume: str) -> Path | None:
    """The preferred checkpoint of `resume_candidates` (not verified), or None."""
    candidates = resume_candidates(run_dir, resume)
    return candidates[0] if candidates else None


def load_checkpoint(
    checkpoint: str | Path, app_state: AppState, *, strict_rank_state: bool = True
) -> dict[str, Any]:
    """Load `checkpoint` into `app_state` in place (collective) and return its `meta.json`.

    Model, optimiser and scheduler are resharded by DCP to any world size. The per-rank state
    (loader position, RNG) comes from this rank's own file when the world size is unchanged. When
    it changed, every rank takes the loader position of rank 0's file — the data loader accepts it
    when its stream is shared by all ranks (`data.shard: rows`) and refuses it otherwise — and
    keeps its freshly seeded RNG. `strict_rank_state=False` keeps the current loader position and
    RNG instead of failing when no usable per-rank file exists. Nothing is unpickled without
    restriction (`checkpoint_io`); an unreadable file raises `CheckpointError` naming it.
    """
    checkpoint = Path(checkpoint)
    if not is_complete(checkpoint):
        raise ValueError(f"{checkpoint} is not a complete checkpoint")
    rank, world_size, distributed = _rank_world()
    meta = read_meta(checkpoint)
    try:
        with _single_process_quiet(distributed):
            dcp.load({"app": app_state}, storage_reader=SafeFileSystemReader(checkpoint),
                     planner=SafeLoadPlanner(), no_dist=not distributed)
    except CheckpointException as err:
        cause = first_failure(err)
        if isinstance(cause, CheckpointError):
            raise cause from None
        raise CheckpointError(f"{checkpoint}: loading the DCP shards failed ({type(cause).__name__}: "
                              f"{cause})") from None
    same_world = meta.get("world_size", world_size) == world_size
    per_rank = rank_file(checkpoint, rank if same_world else 0)
    if per_rank.is_file():
        app_state.load_rank_state_dict(load_rank_file(per_rank), restore_rng=same_world)
    elif strict_rank_state:
        raise ValueError(f"{checkpoint} has no per-rank state file {per_rank.name}; it is incomplete")
    return meta
