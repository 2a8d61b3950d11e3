"""DCP checkpoints: bit-exact round trip (with and without a process group), temp dirs ignored,
keep_last, resume selection, per-rank state, frozen parameters."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from posttrain.config.train import TrainConfig
from posttrain.train import checkpoint as ck
from posttrain.train.checkpoint import AppState, find_resume_checkpoint, load_checkpoint, save_checkpoint
from posttrain.train.optim import build_optimizer
from posttrain.train.schedules import build_scheduler


class Loader:
    """Stands in for the data loader: its state is a plain dict that differs by rank."""

    def __init__(self) -> None:
        self.position = 0
        self.seen = ["a"]

    def state_dict(self) -> dict:
        return {"position": self.position, "seen": list(self.seen), "shape": (2, 3)}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]
        self.seen = list(state["seen"])


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 8)
        self.proj = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)


def make_state(seed: int = 0) -> AppState:
    torch.manual_seed(seed)
    model = Net()
    cfg = TrainConfig(steps=20, lr=1e-2, weight_decay=0.1, warmup_steps=2)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, total_steps=20)
    return AppState(model, opt, sched, Loader(), {"step": 0, "tokens": 0})


def train(app: AppState, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        ids = torch.randint(0, 11, (4,))  # consumes the torch RNG, as dropout / sampling would
        loss = app.model.norm(app.model.proj(app.model.embed(ids))).pow(2).mean() + random.random() * 0
        loss = loss * float(np.random.rand() + 1.0)
        loss.backward()
        app.optimizer.step()
        app.optimizer.zero_grad()
        app.scheduler.step()
        app.loader.position += 4
        app.loader.seen.append(str(app.loader.position))
        app.counters["step"] += 1
        app.counters["tokens"] += 4
        losses.append(loss.item())
    return losses


def snapshot(app: AppState) -> dict:
    return {
        "params": {n: p.detach().clone() for n, p in app.model.named_parameters()},
        "optim": {
            k: v.clone() for i, s in app.optimizer.state.items() for k2, v in s.items() for k in [f"{i}.{k2}"]
        },
        "lr": [g["lr"] for g in app.optimizer.param_groups],
        "sched": app.scheduler.state_dict(),
        "loader": app.loader.state_dict(),
        "counters": dict(app.counters),
        "rng": (random.random(), float(np.random.rand()), torch.rand(3)),
    }


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a["params"]:
        assert torch.equal(a["params"][name], b["params"][name]), name
    assert a["optim"].keys() == b["optim"].keys()
    for key in a["optim"]:
        assert torch.equal(a["optim"][key], b["optim"][key]), key
    assert a["lr"] == b["lr"] and a["sched"] == b["sched"]
    assert a["loader"] == b["loader"] and a["counters"] == b["counters"]
    assert a["rng"][0] == b["rng"][0] and a["rng"][1] == b["rng"][1]
    assert torch.equal(a["rng"][2], b["rng"][2])


@pytest.fixture(params=["no_process_group", "gloo_world_1"])
def process_group(request, tmp_path):
    if request.param == "gloo_world_1":
        dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg-store", rank=0, world_size=1)
        yield request.param
        dist.destroy_process_group()
    else:
        yield request.param


def test_save_mutate_load_is_bit_exact(tmp_path, process_group):
    app = make_state()
    train(app, 3)
    random.seed(1)
    np.random.seed(2)
    path = save_checkpoint(tmp_path, 3, app, {"tokens": app.counters["tokens"], "config_hash": "abc"})
    assert path == tmp_path / "checkpoints" / "step_3"
    expected = snapshot(app)  # also draws from every RNG: the draws after load must repeat
    continued = train(app, 4)

    restored = make_state(seed=123)  # different init, untouched optimiser
    meta = load_checkpoint(path, restored)
    assert meta["step"] == 3 and meta["tokens"] == 12 and meta["config_hash"] == "abc"
    assert meta["world_size"] == 1 and "saved_at" in meta
    assert_same(snapshot(restored), expected)
    assert train(restored, 4) == continued  # the same trajectory after resuming
    for (name, a), (_, b) in zip(app.model.named_parameters(), restored.model.named_parameters()):
        assert torch.equal(a, b), name


def test_layout_latest_and_rank_files(tmp_path):
    app = make_state()
    path = save_checkpoint(tmp_path, 5, app, {"tokens": 0})
    names = {p.name for p in path.iterdir()}
    assert {".metadata", "meta.json", "rank_0.pt"} <= names
    assert any(n.endswith(".distcp") for n in names)
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_5"
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    assert json.loads((path / "meta.json").read_text())["step"] == 5


def test_crashed_temp_dir_and_incomplete_dirs_are_ignored(tmp_path):
    app = make_state()
    save_checkpoint(tmp_path, 2, app)
    root = tmp_path / "checkpoints"
    crashed = root / ".tmp-step_9"  # a save killed half-way
    crashed.mkdir()
    (crashed / ".metadata").write_bytes(b"partial")
    broken = root / "step_7"  # renamed by hand, no meta.json
    broken.mkdir()
    (root / "latest").write_text("step_9\n")  # even a pointer to garbage is not trusted
    assert find_resume_checkpoint(tmp_path, "auto") == root / "step_2"
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step_2"]
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        load_checkpoint(crashed, make_state())
    # the next save clears the crash leftovers
    save_checkpoint(tmp_path, 4, app, keep_last=3)
    assert not crashed.exists()


def test_keep_last(tmp_path):
    app = make_state()
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, app, keep_last=2)
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step_3", "step_4"]
    assert find_resume_checkpoint(tmp_path, "auto").name == "step_4"
    # re-saving an existing step replaces it and still keeps it
    save_checkpoint(tmp_path, 3, app, {"again": True}, keep_last=1)
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step_3"]
    assert ck.read_meta(tmp_path / "checkpoints" / "step_3")["again"] is True


def test_latest_wins_over_a_higher_abandoned_step(tmp_path):
    """After resuming from an earlier checkpoint, `latest` names the run's real newest one."""
    app = make_state()
    for step in (10, 20):
        save_checkpoint(tmp_path, step, app)
    save_checkpoint(tmp_path, 15, app)  # resumed from step_10 and saved again
    assert find_resume_checkpoint(tmp_path, "auto").name == "step_15"
    (tmp_path / "checkpoints" / "latest").unlink()
    assert find_resume_checkpoint(tmp_path, "auto").name == "step_20"  # fallback: highest step


def test_find_resume_modes(tmp_path):
    assert find_resume_checkpoint(tmp_path, "auto") is None
    assert find_resume_checkpoint(tmp_path, "never") is None
    app = make_state()
    path = save_checkpoint(tmp_path / "run", 6, app)
    assert find_resume_checkpoint(tmp_path / "run", "never") is None
    assert find_resume_checkpoint(tmp_path / "other", str(path)) == path
    assert find_resume_checkpoint(tmp_path / "other", str(tmp_path / "run")) == path
    assert find_resume_checkpoint(tmp_path / "other", str(tmp_path / "run" / "checkpoints")) == path
    with pytest.raises(ValueError, match="does not exist"):
        find_resume_checkpoint(tmp_path, str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither a complete checkpoint"):
        find_resume_checkpoint(tmp_path, str(tmp_path / "empty"))


def test_missing_rank_state(tmp_path):
    app = make_state()
    train(app, 1)
    path = save_checkpoint(tmp_path, 1, app)
    ck.rank_file(path, 0).rename(path / "rank_1.pt")  # as if saved by another rank layout
    with pytest.raises(ValueError, match="no per-rank state file rank_0.pt"):
        load_checkpoint(path, make_state())
    restored = make_state()
    load_checkpoint(path, restored, strict_rank_state=False)
    assert restored.counters["step"] == 1 and restored.loader.position == 0


def test_frozen_parameters_can_be_left_out(tmp_path):
    app = make_state()
    app.model.embed.weight.requires_grad_(False)
    app.include_frozen = False
    train(app, 1)
    path = save_checkpoint(tmp_path, 1, app)
    restored = make_state(seed=5)
    restored.model.embed.weight.requires_grad_(False)
    restored.include_frozen = False
    frozen_before = restored.model.embed.weight.detach().clone()
    load_checkpoint(path, restored)
    assert torch.equal(restored.model.embed.weight, frozen_before)  # not in the checkpoint
    assert torch.equal(restored.model.proj.weight, app.model.proj.weight)
