"""Checkpoints under injected faults: flipped bytes, truncated and empty files, a crafted pickle,
a full disk, a crash in the middle of pruning. Each is detected and named with its file."""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from posttrain.train import checkpoint as ck
from posttrain.train.checkpoint import load_checkpoint, save_checkpoint
from posttrain.train.checkpoint_io import (
    CheckpointError,
    SafeLoadPlanner,
    file_digests,
    load_metadata,
    verify_checkpoint,
)
from tests.unit.train.test_checkpoint import make_state, train


def _saved(tmp_path: Path, step: int = 2) -> Path:
    app = make_state()
    train(app, step)
    return save_checkpoint(tmp_path, step, app, {"tokens": 0})


def _largest_tensor_region(checkpoint: Path) -> tuple[Path, int, int]:
    """(shard file, offset, length) of the largest tensor stored in the checkpoint."""
    metadata = load_metadata(checkpoint / ".metadata")
    info = max(metadata.storage_data.values(), key=lambda i: i.length)
    return checkpoint / info.relative_path, info.offset, info.length


def _drop_manifest(checkpoint: Path) -> None:
    """As written before manifests existed: loading must still name a broken file."""
    meta = json.loads((checkpoint / "meta.json").read_text())
    del meta["manifest"]
    (checkpoint / "meta.json").write_text(json.dumps(meta))


def _refresh_manifest(checkpoint: Path) -> None:
    """What someone crafting a checkpoint would do: a manifest that matches the files."""
    meta = json.loads((checkpoint / "meta.json").read_text())
    meta["manifest"] = file_digests(checkpoint)
    (checkpoint / "meta.json").write_text(json.dumps(meta))


def test_manifest_lists_every_file_and_verifies(tmp_path):
    path = _saved(tmp_path)
    manifest = json.loads((path / "meta.json").read_text())["manifest"]
    assert set(manifest) == {p.name for p in path.iterdir()} - {"meta.json"}
    assert all(entry["bytes"] == (path / name).stat().st_size for name, entry in manifest.items())
    assert verify_checkpoint(path) == []


def test_flipped_bytes_inside_a_tensor_are_named(tmp_path):
    path = _saved(tmp_path)
    shard, offset, length = _largest_tensor_region(path)
    data = bytearray(shard.read_bytes())
    middle = offset + length // 2
    data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
    shard.write_bytes(bytes(data))
    assert verify_checkpoint(path) == [f"{shard.name}: sha256 mismatch (the content changed after it was written)"]


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _empty(path: Path) -> None:
    path.write_bytes(b"")


@pytest.mark.parametrize("name, damage, cause", [
    ("rank_0.pt", _truncate, "truncated or corrupt"),
    ("rank_0.pt", _empty, "empty file"),
    ("__0_0.distcp", _truncate, "truncated or corrupt"),
    (".metadata", _truncate, "truncated or corrupt"),
])
def test_truncated_and_empty_files_are_named(tmp_path, caplog, name, damage, cause):
    path = _saved(tmp_path)
    damage(path / name)
    problems = verify_checkpoint(path)
    assert len(problems) == 1 and problems[0].startswith(f"{name}: ")
    assert "bytes, the manifest says" in problems[0]
    _drop_manifest(path)  # without a manifest, loading itself names the file and the cause
    assert verify_checkpoint(path) == []
    assert "no checksum manifest (written by an older version); not verified" in caplog.text
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path, make_state(seed=1))
    assert str(path / name) in str(err.value) and cause in str(err.value)


def test_bad_meta_json_names_the_file(tmp_path):
    path = _saved(tmp_path)
    (path / "meta.json").write_text('{"step": 2, "manif')
    problems = verify_checkpoint(path)
    assert len(problems) == 1 and str(path / "meta.json") in problems[0] and "not valid JSON" in problems[0]
    with pytest.raises(CheckpointError, match="meta.json: not valid JSON"):
        load_checkpoint(path, make_state())


def test_an_unlisted_file_is_refused(tmp_path):
    path = _saved(tmp_path)
    (path / "extra.distcp").write_bytes(b"x")
    assert verify_checkpoint(path) == ["extra.distcp: not in the checksum manifest (refused)"]


class _Payload:
    """Runs a shell command when unpickled without restriction."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_metadata_pickle_runs_nothing(tmp_path):
    path = _saved(tmp_path)
    marker = tmp_path / "pwned"
    (path / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    _refresh_manifest(path)  # the checksums cannot help: whoever crafts the file writes them too
    assert verify_checkpoint(path) == []
    with pytest.raises(CheckpointError, match=r"\.metadata: refused .*posix.system is not allowed"):
        load_checkpoint(path, make_state())
    assert not marker.exists()


def test_a_crafted_value_inside_a_shard_runs_nothing(tmp_path):
    """Non-tensor values in the shards (scheduler state, counters) are read with
    weights_only=True; DCP's own planner would unpickle them without restriction."""
    from torch.distributed.checkpoint.metadata import MetadataIndex
    from torch.distributed.checkpoint.planner import LoadItemType, ReadItem

    marker = tmp_path / "pwned"
    buffer = io.BytesIO()
    torch.save(_Payload(marker), buffer)
    buffer.seek(0)
    planner = SafeLoadPlanner()
    planner.set_up_planner({"app": {"counters": {}}}, None, True)
    index = MetadataIndex("app.counters")
    item = ReadItem(LoadItemType.BYTE_IO, index, torch.Size([0]), index, torch.Size([0]), torch.Size([0]))
    with pytest.raises(CheckpointError, match="'app.counters' refused"):
        planner.load_bytes(item, buffer)
    assert not marker.exists()


def test_disk_full_names_the_cause_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    app = make_state()
    save_checkpoint(tmp_path, 1, app)

    def full_disk(*args, **kwargs):  # what torch's zip writer raises on ENOSPC (no errno in it)
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4096 vs 4032")

    monkeypatch.setattr(ck.dcp, "save", full_disk)
    monkeypatch.setattr(ck, "free_bytes", lambda path: 0)
    with pytest.raises(CheckpointError) as err:
        save_checkpoint(tmp_path, 2, app)
    message = str(err.value)
    assert "writing checkpoint step_2 failed: No space left on device" in message
    assert "inline_container" in message and str(tmp_path / "checkpoints" / "step_1") in message
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    assert ck.latest_checkpoint(tmp_path).name == "step_1"


def test_enospc_from_a_file_write_is_named(tmp_path, monkeypatch):
    app = make_state()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ck.torch, "save", full)
    with pytest.raises(CheckpointError, match="No space left on device .* no complete checkpoint exists yet"):
        save_checkpoint(tmp_path, 1, app)


def test_pruning_cleans_incomplete_leftovers(tmp_path):
    app = make_state()
    save_checkpoint(tmp_path, 1, app)
    root = tmp_path / "checkpoints"
    leftover = root / "step_0"  # an older version's pruning killed after deleting meta.json
    leftover.mkdir()
    (leftover / ".metadata").write_bytes(b"x")
    save_checkpoint(tmp_path, 2, app, keep_last=2)
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["step_1", "step_2"]


def test_a_crash_while_pruning_leaves_no_half_deleted_checkpoint(tmp_path, monkeypatch):
    app = make_state()
    save_checkpoint(tmp_path, 1, app)
    save_checkpoint(tmp_path, 2, app)
    root = tmp_path / "checkpoints"

    def killed(path, ignore_errors=False):
        raise KeyboardInterrupt  # stands in for SIGKILL in the middle of deleting

    monkeypatch.setattr(ck.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        ck.prune_checkpoints(tmp_path, keep_last=1)
    monkeypatch.undo()
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step_2"]
    assert {p.name for p in root.iterdir() if p.is_dir()} == {"step_2", ".tmp-pruned-step_1"}
    save_checkpoint(tmp_path, 3, app, keep_last=2)
    assert {p.name for p in root.iterdir() if p.is_dir()} == {"step_2", "step_3"}
