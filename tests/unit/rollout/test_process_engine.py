"""ProcessEngine: the native engine in its own process gives the same samples, takes chunked weight
updates all or nothing, refuses a bad update and stays up, and raises EngineDied once killed until
restarted."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from posttrain.models.hf import load_hf
from posttrain.rollout import NativeEngine, SamplingParams
from posttrain.rollout.process_engine import EngineDied, ProcessEngine
from tests.unit.rollout.test_native_engine import PROMPTS, _perturbed, _snapshot

SAMPLED = SamplingParams(temperature=0.9, max_new_tokens=6)


@pytest.fixture(scope="module")
def engines(tiny_checkpoints):
    model_dir = tiny_checkpoints["llama"]
    remote = ProcessEngine(model_dir)
    yield NativeEngine(load_hf(model_dir), AutoTokenizer.from_pretrained(model_dir)), remote, model_dir
    remote.close()


def same(a, b) -> bool:
    return torch.equal(a.tokens, b.tokens) and torch.equal(a.logprobs, b.logprobs) and a.texts == b.texts


def test_same_samples_as_in_process(engines):
    local, remote, _ = engines
    assert remote.pad_id == local.pad_id
    assert same(remote.generate(PROMPTS, SAMPLED, n=2, seed=3), local.generate(PROMPTS, SAMPLED, n=2, seed=3))


def test_updates_bad_updates_and_death(engines, monkeypatch):
    local, remote, model_dir = engines
    original = _snapshot(load_hf(model_dir))
    before = remote.generate(PROMPTS, SAMPLED, seed=1)
    monkeypatch.setattr("posttrain.rollout.process_engine.CHUNK_BYTES", 4096)  # many chunks
    remote.update_weights(_perturbed(original), version=5)
    assert remote.policy_version == 5
    changed = remote.generate(PROMPTS, SAMPLED, seed=1)
    assert not torch.equal(changed.tokens, before.tokens) or not torch.equal(changed.logprobs, before.logprobs)
    with pytest.raises(ValueError, match="unknown tensor"):
        remote.update_weights(original[:3] + [("model.bogus.weight", torch.zeros(2))] + original[3:])
    assert same(remote.generate(PROMPTS, SAMPLED, seed=1), changed)  # refused whole, still up
    remote.update_weights(original, version=6)
    assert same(remote.generate(PROMPTS, SAMPLED, seed=1), before)
    remote.process.kill()
    remote.process.join()
    with pytest.raises(EngineDied):
        remote.generate(PROMPTS, SAMPLED, seed=1)
    remote.restart()
    assert remote.restarts == 1 and same(remote.generate(PROMPTS, SAMPLED, seed=1), before)
