from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import posttrain.train.reference_cache as reference_cache
from posttrain.demo_task import write_task
from tests.integration.dpo_configs import REPO, write_pairs


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """The demo's addition task (200 training rows, 8 held out) in a temporary directory."""
    out = tmp_path_factory.mktemp("task")
    write_task(out, train=200, held_out=8)
    return out


# ---- DPO test modules (tests/integration/test_dpo*.py)


@pytest.fixture(scope="module")
def one_thread():
    """The tiny model's matrices are too small to gain from threads; on a busy machine two threads
    that wait for each other make a run 10x slower (measured 13 s vs 1.2 s for 4 steps)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dir(tiny_checkpoints) -> Path:
    return tiny_checkpoints["llama"]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> SimpleNamespace:
    """A training file (32 pairs) and a held-out one (8 pairs), never modified."""
    root = tmp_path_factory.mktemp("pairs")
    return SimpleNamespace(train=write_pairs(root / "train.jsonl", 32),
                           held_out=write_pairs(root / "held_out.jsonl", 8, variant="Held out. "))


@pytest.fixture(scope="module")
def hh_path() -> Path:
    """The real HH-RLHF harmless pairs (shared data; absent on a user's machine)."""
    path = REPO.parent / "shared" / "data" / "hh_harmless_pairs.jsonl.gz"
    if not path.exists():
        pytest.skip(f"shared data not found at {path}")
    return path


@pytest.fixture
def pass_forwards(monkeypatch):
    """Counts the reference pass's forward passes (`reference_cache.token_logprobs` calls)."""
    calls = []
    real = reference_cache.token_logprobs

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(reference_cache, "token_logprobs", counted)
    return calls


@pytest.fixture
def skipped_rows(monkeypatch):
    """Every row skipped under `on_error: skip`, as its error message (whether or not it is logged:
    a row is logged once per process)."""
    from posttrain.data.skips import SkipWatch

    errors = []
    real = SkipWatch.skipped

    def recording(self, error):
        errors.append(str(error))
        return real(self, error)

    monkeypatch.setattr(SkipWatch, "skipped", recording)
    return errors



@pytest.fixture(scope="module")
def ray_instance():
    """A local Ray instance with 2 CPUs for the module (reused when one is already up)."""
    import ray

    from posttrain.cluster.ray_runtime import init_ray
    from posttrain.config.launcher import LauncherConfig

    started = init_ray(LauncherConfig(backend="ray", num_workers=2), num_cpus=2)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    """A 4-layer tiny llama: a distillation teacher whose even layers make a 2-layer student."""
    from tests.tiny_models import build_byte_tokenizer, build_checkpoint_from_config, tiny_config

    config = tiny_config("llama", vocab_size=len(build_byte_tokenizer()))
    config.num_hidden_layers = 4
    return build_checkpoint_from_config(config, tmp_path_factory.mktemp("teacher") / "llama4", seed=3)
