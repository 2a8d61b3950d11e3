"""Reading checkpoint files without trusting them: checksums, restricted unpickling, clear errors.

Trust model. A checkpoint is data, never code. Every file is read with a loader that can only
build plain values:

* `.metadata` (DCP's index, a pickle) goes through `MetadataUnpickler`, which admits only the
  DCP metadata classes, `torch.Size`, dtypes, layouts and paths; anything else (`os.system`, a
  class with `__reduce__`) is refused before it is called.
* Non-tensor values inside the `.distcp` shards (scheduler state, counters, optimiser settings)
  are read with `torch.load(weights_only=True)` (`SafeLoadPlanner`), as are tensors and the
  per-rank `rank_<r>.pt` files.
* `meta.json` is JSON.

The checksum manifest in `meta.json` (`file_digests`) detects corruption (a flipped byte, a
truncated or missing file) and refuses files it does not list. It is not a signature: whoever can
write a checkpoint can write its manifest, so a checkpoint from elsewhere is safe to *load*
because of the restricted readers, and is only as *trustworthy in content* as its source.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import io
import json
import pickle
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.planner import LoadPlan, ReadItem

logger = logging.getLogger("posttrain.train")

META_FILE = "meta.json"
MANIFEST_KEY = "manifest"
CHUNK_BYTES = 8 << 20


class CheckpointError(ValueError):
    """A checkpoint that cannot be written or read; the message names the file and the cause."""


# ----------------------------------------------------------------------------- checksums


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _files(directory: Path) -> Iterator[Path]:
    """Regular files under `directory`, sorted, `meta.json` and NFS silly-rename files left out."""
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.name != META_FILE and not path.name.startswith(".nfs"):
            yield path


def file_digests(directory: str | Path) -> dict[str, dict[str, Any]]:
    """`{relative path: {"bytes": size, "sha256": hex}}` for every file of a checkpoint."""
    directory = Path(directory)
    return {
        p.relative_to(directory).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
        for p in _files(directory)
    }


def layout_problems(directory: str | Path, manifest: dict[str, dict[str, Any]]) -> list[str]:
    """Files the manifest lists that are missing, and files it does not list (refused)."""
    directory = Path(directory)
    present = {p.relative_to(directory).as_posix() for p in _files(directory)}
    return ([f"{name}: missing" for name in sorted(set(manifest) - present)]
            + [f"{name}: not in the checksum manifest (refused)" for name in sorted(present - set(manifest))])


def content_problems(directory: str | Path, manifest: dict[str, dict[str, Any]], names: list[str]) -> dict[str, str]:
    """`{name: problem}` for the files among `names` whose size or sha256 differs."""
    problems = {}
    for name in names:
        want, path = manifest[name], Path(directory) / name
        size = path.stat().st_size
        if size != want["bytes"]:
            problems[name] = f"{name}: {size} bytes, the manifest says {want['bytes']} (truncated or overwritten)"
        elif sha256_file(path) != want["sha256"]:
            problems[name] = f"{name}: sha256 mismatch (the content changed after it was written)"
    return problems


def verify_checkpoint(checkpoint: str | Path, device: torch.device | str = "cpu") -> list[str]:
    """What is wrong with `checkpoint` (empty when it is intact): `meta.json` readable, every
    file its manifest lists present with its size and sha256, no unlisted file.

    Collective under a process group: each rank hashes its share of the files and all ranks
    get the same answer (`device` holds the tensor the verdicts are summed in). A checkpoint
    without a manifest (written before manifests existed) passes with a warning.
    """
    checkpoint = Path(checkpoint)
    try:
        meta = read_meta(checkpoint)
    except CheckpointError as err:
        return [str(err)]
    manifest = meta.get(MANIFEST_KEY)
    if manifest is None:
        logger.warning("%s has no checksum manifest (written by an older version); not verified", checkpoint)
        return []
    problems = layout_problems(checkpoint, manifest)
    if problems:
        return problems
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    names = sorted(manifest)
    found = content_problems(checkpoint, manifest, names[rank::world])
    if not distributed:
        return list(found.values())
    flags = torch.tensor([int(name in found) for name in names], dtype=torch.int32, device=device)
    dist.all_reduce(flags)
    return [found.get(name, f"{name}: size or sha256 mismatch") for name, bad in zip(names, flags.tolist()) if bad]


def first_failure(err: BaseException) -> BaseException:
    """The first rank's exception inside DCP's `CheckpointException` (`err` itself otherwise)."""
    failures = getattr(err, "failures", None)
    if failures:
        return failures[min(failures)][0]
    return err


# ----------------------------------------------------------------------------- meta.json and rank files


def read_meta(checkpoint: str | Path) -> dict[str, Any]:
    path = Path(checkpoint) / META_FILE
    try:
        meta = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; the checkpoint is incomplete") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err}); the file is truncated or corrupt") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    return meta


def load_rank_file(path: Path) -> dict[str, Any]:
    """A per-rank state file (loader position, RNG): tensors and plain values only."""
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file; the checkpoint is truncated")
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"{path}: refused or unreadable content ({err})") from None
    except (OSError, EOFError, RuntimeError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot be read ({type(err).__name__}: {err}); the file is "
                              "truncated or corrupt") from None


# ----------------------------------------------------------------------------- DCP, restricted

_ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {("torch.distributed.checkpoint.metadata", c) for c in (
        "Metadata", "MetadataIndex", "StorageMeta", "ChunkStorageMetadata", "TensorProperties",
        "TensorStorageMetadata", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING")}
    | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
       ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
       ("builtins", "set"), ("builtins", "frozenset")}
    | {("pathlib", c) for c in ("Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath")}
)
_RESOLVED = {
    ("torch.distributed.checkpoint.metadata", name): getattr(dcp_metadata, name)
    for _, name in _ALLOWED_GLOBALS if hasattr(dcp_metadata, name)
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"): _StorageInfo}


class MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata only: any other global is refused before it can be called."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _RESOLVED:
            return _RESOLVED[(module, name)]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in checkpoint metadata")


def load_metadata(path: Path) -> dcp_metadata.Metadata:
    try:
        with open(path, "rb") as f:
            metadata = MetadataUnpickler(f).load()
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"{path}: refused ({err}); the file is corrupt or not a DCP index") from None
    except (EOFError, OSError, AttributeError, TypeError, ValueError, IndexError, KeyError) as err:
        raise CheckpointError(f"{path}: cannot be read ({type(err).__name__}: {err}); the file is "
                              "truncated or corrupt") from None
    if not isinstance(metadata, dcp_metadata.Metadata):
        raise CheckpointError(f"{path}: holds a {type(metadata).__name__}, not DCP metadata")
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """DCP's filesystem reader with restricted metadata unpickling and errors naming the file."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_metadata.Metadata:
        metadata = load_metadata(Path(self._get_metadata_path(kwargs.get("rank"))))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def read_data(self, plan: LoadPlan, planner: Any):
        by_file: dict[str, list[ReadItem]] = {}
        for item in plan.items:
            by_file.setdefault(self.storage_data[item.storage_index].relative_path, []).append(item)
        future = None
        for name, items in by_file.items():
            try:
                future = super().read_data(dataclasses.replace(plan, items=items), planner)
            except CheckpointError:
                raise
            except Exception as err:  # torch's zip reader errors do not name the file
                path = Path(self.path) / name
                raise CheckpointError(f"{path}: cannot be read ({type(err).__name__}: {err}); the "
                                      "file is truncated or corrupt") from None
        return future if future is not None else super().read_data(plan, planner)


class SafeLoadPlanner(DefaultLoadPlanner):
    """Reads the non-tensor values of the shards with `weights_only=True` (DCP's default unpickles
    them without restriction)."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        try:
            loaded = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as err:
            raise CheckpointError(f"value {read_item.dest_index.fqn!r} refused: {err}") from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


# ----------------------------------------------------------------------------- write errors


def free_bytes(path: Path) -> int | None:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def is_out_of_space(err: BaseException, free: int | None) -> bool:
    """ENOSPC anywhere in the exception chain, or (torch's zip writer hides errno) < 1 MiB free."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return free is not None and free < (1 << 20)


def describe_write_error(err: BaseException, where: Path, free: int | None) -> str:
    cause = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
    if is_out_of_space(err, free):
        shown = f"{free:,} bytes free" if free is not None else "free space unknown"
        return f"No space left on device under {where} ({shown}; {cause})"
    return cause


__all__ = [
    "CheckpointError",
    "MetadataUnpickler",
    "SafeFileSystemReader",
    "SafeLoadPlanner",
    "describe_write_error",
    "content_problems",
    "file_digests",
    "first_failure",
    "layout_problems",
    "verify_checkpoint",
    "free_bytes",
    "load_metadata",
    "load_rank_file",
    "read_meta",
]
