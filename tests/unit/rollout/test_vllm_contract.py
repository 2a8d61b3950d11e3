"""The vLLM engine's contract that needs no vLLM: the client writes weight parts the server's check
accepts (and refuses what it must), seeds, and the errors a user sees before any process starts."""

from __future__ import annotations

import sys

import pytest
import torch
from safetensors import safe_open

from posttrain.config import ConfigError
from posttrain.demo_task import write_task
from posttrain.models.hf import load_hf
from posttrain.parallel.export import iter_hf_tensors_for_sync
from posttrain.rollout.vllm_engine import SERVER_DIR, prompt_seed, thread_cores, vllm_python, write_parts
from tests.integration.grpo_configs import grpo_config, load

sys.path.insert(0, str(SERVER_DIR))
import posttrain_vllm_server as server  # noqa: E402 - the server's module, runnable without vLLM


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("task")
    write_task(out, train=8, held_out=2)
    return out


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoints):
    return tiny_checkpoints["llama"]


def test_a_full_update_is_written_in_parts_the_server_accepts(checkpoint, tmp_path):
    model = load_hf(checkpoint, dtype=torch.float32)
    expected = dict(iter_hf_tensors_for_sync(model))
    paths = write_parts(iter_hf_tensors_for_sync(model), tmp_path, torch.bfloat16, part_bytes=4096)
    assert len(paths) > 1
    server.check_parts(paths, server.checkpoint_table(str(checkpoint)))
    seen = {}
    for path in paths:
        with safe_open(path, framework="pt") as f:
            seen.update({name: f.get_tensor(name) for name in f.keys()})
    assert seen.keys() == expected.keys()
    for name, tensor in seen.items():
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, expected[name].to(torch.bfloat16))


def test_the_server_refuses_unknown_repeated_and_missing_names_shapes_and_integer_dtypes(checkpoint, tmp_path):
    table = server.checkpoint_table(str(checkpoint))
    name, (shape, _) = next(iter(table.items()))
    cases = {
        "unknown": ([("model.nope.weight", torch.zeros(2))], "is not a tensor of the engine's checkpoint"),
        "shape": ([(name, torch.zeros(*[s + 1 for s in shape]))], "has shape"),
        "dtype": ([(name, torch.zeros(*shape, dtype=torch.int32))], "floating-point dtype"),
    }
    for case, (stream, message) in cases.items():
        (tmp_path / case).mkdir()
        paths = write_parts(stream, tmp_path / case, torch.float32)
        with pytest.raises(ValueError, match=message):
            server.check_parts(paths, table)
    (tmp_path / "twice").mkdir()
    first = write_parts([(name, torch.zeros(*shape))], tmp_path / "twice", torch.float32)
    (tmp_path / "again").mkdir()
    second = write_parts([(name, torch.zeros(*shape))], tmp_path / "again", torch.float32)
    with pytest.raises(ValueError, match="is sent twice"):
        server.check_parts(first + second, table)
    with pytest.raises(ValueError, match="tensors of the checkpoint are missing"):
        server.check_parts(first, table)
    with pytest.raises(ValueError, match="is sent twice"):
        write_parts([(name, torch.zeros(*shape)), (name, torch.zeros(*shape))], tmp_path, torch.float32, part_bytes=1)


def test_prompt_seeds_are_stable_distinct_and_leave_room_for_the_sample_index():
    seeds = {prompt_seed(seed, index) for seed in range(4) for index in range(256)}
    assert len(seeds) == 4 * 256
    assert all(0 <= s < 2**60 for s in seeds)
    assert prompt_seed(3, 17) == prompt_seed(3, 17)


def test_a_missing_vllm_environment_names_the_command_that_makes_it(tmp_path, monkeypatch):
    monkeypatch.delenv("POSTTRAIN_VLLM_PYTHON", raising=False)
    with pytest.raises(FileNotFoundError, match="make vllm-env"):
        vllm_python(tmp_path / "nothing" / "python")


def test_vllm_config_errors_are_named(checkpoint, task_dir, tmp_path):
    with pytest.raises(ConfigError, match="rollout.lm_head_fp32"):
        load(grpo_config(checkpoint, task_dir, tmp_path,
                         rollout={"engine": "vllm", "dtype": "bfloat16", "lm_head_fp32": True}))
    cfg = load(grpo_config(checkpoint, task_dir, tmp_path,
                           rollout={"engine": "vllm", "lm_head_fp32": True, "vllm": {"kv_cache_gib": 2}}))
    assert cfg.engine_dtype == "float32" and cfg.rollout.vllm.kv_cache_gib == 2


def test_a_server_that_cannot_start_is_reported_with_its_reason(checkpoint, tmp_path):
    """The whole start-up path (socket, authkey, settings, the server's own error, clean-up) with
    an interpreter that has no vLLM: the server's failure reaches the caller as `EngineDied`."""
    from posttrain.rollout.process_engine import EngineDied
    from posttrain.rollout.vllm_engine import VLLMEngine

    with pytest.raises(EngineDied, match="No module named 'vllm'"):
        VLLMEngine(checkpoint, python=sys.executable, log_path=tmp_path / "engine.log")


def test_vllm_threads_get_an_equal_share_of_the_usable_cores_per_rank(monkeypatch):
    import os

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {4, 5, 6, 7, 8, 9})
    assert thread_cores(None) == [4, 5, 6, 7, 8, 9]  # every core, none reserved
    assert thread_cores(2) == [4, 5]
    assert thread_cores(None, local_rank=1, local_world_size=2) == [7, 8, 9]
    assert thread_cores(1, local_rank=2, local_world_size=3) == [8]
    assert thread_cores(None, local_rank=0, local_world_size=8) == [4]  # more ranks than cores: one each
    with pytest.raises(ValueError, match=r"threads=4 but this rank's share of the cores is 3"):
        thread_cores(4, local_rank=0, local_world_size=2)


def test_layers_sharing_a_weight_are_post_processed_again_after_a_reload():
    import posttrain_vllm_worker as worker

    class Method:  # vLLM's quant method: post-processing repacks the layer's weight (CPU)
        def __init__(self):
            self.calls = []

        def process_weights_after_loading(self, layer):
            self.calls.append(layer)

    model = torch.nn.Module()
    model.embed, model.head, model.proj = (torch.nn.Module() for _ in range(3))
    shared = torch.nn.Parameter(torch.ones(4, 2))
    for module, weight in ((model.embed, shared), (model.head, shared), (model.proj, torch.nn.Parameter(torch.ones(2, 2)))):
        module.weight, module.quant_method = weight, Method()
    assert worker.refresh_shared_weights(model) == 2
    assert model.embed.quant_method.calls == [model.embed] and model.head.quant_method.calls == [model.head]
    assert model.proj.quant_method.calls == []  # a weight of its own was post-processed by the reload
