"""Mesh, TP plan, FSDP2, sharded load and export on 2 gloo ranks (spawned processes) vs one device."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from posttrain.cluster.dist_env import find_free_port
from posttrain.config.parallel import ParallelConfig
from posttrain.models.hf import build_meta_model, load_hf, read_hf_config, save_hf
from posttrain.models.lora import apply_lora, merge_lora
from posttrain.parallel.mesh import ParallelDims
from posttrain.parallel.tp import check_tp_divisible

TARGETS = ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]


# ------------------------------------------------------------------------------------ config


def test_dp_shard_resolves_and_mismatches_name_the_keys():
    assert ParallelDims.resolve(ParallelConfig(), 4) == ParallelDims(dp_shard=4, tp=1)
    assert ParallelDims.resolve(ParallelConfig(tp=2), 4) == ParallelDims(dp_shard=2, tp=2)
    with pytest.raises(ValueError, match=r"parallel.dp_shard \(3\) \* parallel.tp \(1\) = 3, but there are 4 ranks"):
        ParallelDims.resolve(ParallelConfig(dp_shard=3), 4)
    with pytest.raises(ValueError, match="parallel.tp: 3 does not divide the world size 4"):
        ParallelDims.resolve(ParallelConfig(tp=3), 4)
    with pytest.raises(ValueError, match="dp_shard"):
        ParallelConfig(dp_shard=0)


def test_tp_divisibility_error_lists_the_sizes(smollm2_dir):
    _, args = read_hf_config(smollm2_dir)  # 9 heads, 3 kv heads
    with pytest.raises(ValueError, match=r"parallel.tp: 2 does not divide this model's num_heads=9, num_kv_heads=3"):
        check_tp_divisible(args, 2)
    check_tp_divisible(args, 3)


def test_tp_rejects_lora_dropout(tiny_checkpoints):
    from posttrain.parallel.tp import apply_tp

    class TwoRanks:  # the checks run before the mesh is used
        def size(self) -> int:
            return 2

    _, args = read_hf_config(tiny_checkpoints["llama"])
    model = build_meta_model(args)
    apply_lora(model, rank=4, alpha=8, dropout=0.1, target_modules=TARGETS)
    with pytest.raises(ValueError, match="lora.dropout > 0 does not work with parallel.tp > 1"):
        apply_tp(model, TwoRanks())


# ------------------------------------------------------------------------------------ helpers


def _spawn(fn, world: int, *args) -> None:
    mp.spawn(_rank_main, args=(world, find_free_port("127.0.0.1"), fn, args), nprocs=world, join=True)


def _rank_main(rank: int, world: int, port: int, fn, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, *args)
    finally:
        dist.destroy_process_group()


def _seeded(name: str, shape: torch.Size) -> torch.Tensor:
    """A non-trivial adapter init (lora_B != 0) that is the same everywhere."""
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    return torch.randn(shape, generator=g) * 0.05


def _sharded(model_dir: Path, cfg: ParallelConfig, lora: bool):
    from posttrain.parallel.load import load_sharded
    from posttrain.parallel.mesh import build_mesh
    from posttrain.parallel.parallelize import parallelize_model

    source, args = read_hf_config(model_dir)
    model = build_meta_model(args)
    if lora:
        apply_lora(model, rank=4, alpha=8, target_modules=TARGETS)
    parallelize_model(model, build_mesh(cfg, dist.get_world_size()), cfg)
    return load_sharded(model, source, init_missing=_seeded if lora else None)


def _reference(model_dir: Path, lora: bool):
    model = load_hf(model_dir)
    if lora:
        apply_lora(model, rank=4, alpha=8, target_modules=TARGETS)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.copy_(_seeded(name, p.shape))
    return model


# ------------------------------------------------------------------------------------ load/export

CASES = [  # family, dp_shard, tp, lora
    ("qwen2", 2, 1, False),  # tied embedding, q/k/v biases
    ("llama", 2, 1, True),
    ("qwen3", 1, 2, False),  # per-head q/k norms under TP
    ("gemma3", 1, 2, True),
]


def _check_load_forward_export(rank: int, dirs: dict[str, Path], out: Path) -> None:
    from posttrain.parallel.export import save_hf_sharded

    for family, dp, tp, lora in CASES:
        tag = f"{family} dp{dp} tp{tp} lora={lora}"
        model = _sharded(dirs[family], ParallelConfig(dp_shard=dp, tp=tp), lora)
        reference = _reference(dirs[family], lora)
        expected = dict(reference.named_parameters())
        for name, p in model.named_parameters():
            assert torch.equal(p.full_tensor(), expected[name]), (tag, name)

        ids = torch.randint(0, 250, (2, 12), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            torch.testing.assert_close(model(ids), reference(ids), rtol=1e-5, atol=1e-5, msg=tag)

        export = out / f"{family}-{rank}"
        save_hf_sharded(model, export)
        if rank == 0:
            merged = save_hf(merge_lora(reference), out / f"{family}-ref")
            got, want = load_file(export / "model.safetensors"), load_file(merged / "model.safetensors")
            assert got.keys() == want.keys(), tag
            for key in want:
                torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6, msg=f"{tag} {key}")
            assert (export / "config.json").read_text() == (merged / "config.json").read_text()


def test_sharded_load_forward_and_export_match_one_device(tiny_checkpoints, tmp_path):
    _spawn(_check_load_forward_export, 2, tiny_checkpoints, tmp_path)


def test_export_splits_files_like_save_hf(tiny_checkpoints, tmp_path):
    """Several shards with an index, named and split as `save_hf` does (world of one)."""
    _spawn(_export_in_shards, 1, tiny_checkpoints["llama"], tmp_path)
    reference = save_hf(load_hf(tiny_checkpoints["llama"]), tmp_path / "ref", max_shard_bytes=40_000)
    names = sorted(p.name for p in (tmp_path / "sharded").glob("*.safetensors"))
    assert names == sorted(p.name for p in reference.glob("*.safetensors")) and len(names) > 1
    assert (tmp_path / "sharded" / "model.safetensors.index.json").read_text() == (
        reference / "model.safetensors.index.json"
    ).read_text()
    for name in names:
        got, want = load_file(tmp_path / "sharded" / name), load_file(reference / name)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def _export_in_shards(rank: int, model_dir: Path, out: Path) -> None:
    from posttrain.parallel.export import save_hf_sharded

    save_hf_sharded(_sharded(model_dir, ParallelConfig(), lora=False), out / "sharded", max_shard_bytes=40_000)


# ------------------------------------------------------------------------------------ checkpoints


def _one_step(model, optimizer, seed: int) -> None:
    """One AdamW step on a batch drawn from `seed` (the same global batch at any world size)."""
    ids = torch.randint(0, 250, (4, 16), generator=torch.Generator().manual_seed(seed))
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine = ids.chunk(world)[rank]
    hidden = model(mine)
    (torch.nn.functional.linear(hidden, model.head_weight).logsumexp(-1).mean()).backward()
    optimizer.step()
    optimizer.zero_grad()


def _full_state(model, optimizer) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        out[name] = p.full_tensor() if hasattr(p, "full_tensor") else p.detach().clone()
        for key in ("exp_avg", "exp_avg_sq"):
            t = optimizer.state[p][key]
            out[f"{name}/{key}"] = t.full_tensor() if hasattr(t, "full_tensor") else t.clone()
    return out


def _save_on_two(rank: int, model_dir: Path, run: Path) -> None:
    from posttrain.config.train import TrainConfig
    from posttrain.train.checkpoint import AppState, save_checkpoint
    from posttrain.train.optim import build_optimizer

    model = _sharded(model_dir, ParallelConfig(), lora=False)
    optimizer = build_optimizer(model, TrainConfig(steps=1, lr=1e-3))
    _one_step(model, optimizer, seed=0)
    save_checkpoint(run, 1, AppState(model, optimizer, counters={"step": 1}))
    state = _full_state(model, optimizer)
    if rank == 0:
        torch.save(state, run / "two.pt")


def _load_on_two(rank: int, model_dir: Path, run: Path) -> None:
    from posttrain.config.train import TrainConfig
    from posttrain.train.checkpoint import AppState, load_checkpoint
    from posttrain.train.optim import build_optimizer

    model = _sharded(model_dir, ParallelConfig(), lora=False)
    optimizer = build_optimizer(model, TrainConfig(steps=1, lr=1e-3))
    load_checkpoint(run / "checkpoints" / "step_2", AppState(model, optimizer, counters={"step": 0}), strict_rank_state=False)
    got, want = _full_state(model, optimizer), torch.load(run / "one.pt")
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key


def test_checkpoint_saved_on_two_ranks_resumes_on_one_and_back(tiny_checkpoints, tmp_path):
    from posttrain.config.train import TrainConfig
    from posttrain.train.checkpoint import AppState, load_checkpoint, save_checkpoint
    from posttrain.train.optim import build_optimizer

    model_dir = tiny_checkpoints["qwen2"]
    _spawn(_save_on_two, 2, model_dir, tmp_path)

    model = load_hf(model_dir)  # 2 -> 1: DCP reshards FSDP2 shards into plain tensors
    optimizer = build_optimizer(model, TrainConfig(steps=1, lr=1e-3))
    counters = {"step": 0}  # DCP fills the keys the state already has
    load_checkpoint(tmp_path / "checkpoints" / "step_1", AppState(model, optimizer, counters=counters),
                    strict_rank_state=False)
    assert counters == {"step": 1}
    got, want = _full_state(model, optimizer), torch.load(tmp_path / "two.pt")
    for key in want:
        assert torch.equal(got[key], want[key]), key

    _one_step(model, optimizer, seed=1)  # 1 -> 2: plain tensors resharded onto the mesh
    save_checkpoint(tmp_path, 2, AppState(model, optimizer, counters={"step": 2}))
    torch.save(_full_state(model, optimizer), tmp_path / "one.pt")
    _spawn(_load_on_two, 2, model_dir, tmp_path)


# ------------------------------------------------------------------------------------ generation

GEN_PROMPTS = [[60, 61, 62, 63, 64, 65, 66], [70, 71], [80, 81, 82, 83, 84, 85, 86, 87, 88]]
GEN_TOKENS = 8


def _recording_caches(model) -> list:
    """Wrap `model.new_cache` so the caches `generate` builds can be inspected."""
    caches, new_cache = [], model.new_cache

    def recording(*args):
        caches.append(new_cache(*args))
        return caches[-1]

    model.new_cache = recording
    return caches


def _greedy(model, tokenizer):
    from posttrain.models.generate import generate

    return generate(model, tokenizer, GEN_PROMPTS, max_new_tokens=GEN_TOKENS, temperature=0)


def _close_logprobs(actual: list[list[float]], expected: list[list[float]], eps: float) -> None:
    """Equal up to a few rounding steps (`eps`: the compute dtype's epsilon) of their magnitude."""
    a, b = torch.tensor(sum(actual, [])), torch.tensor(sum(expected, []))
    torch.testing.assert_close(a, b, atol=4 * eps * max(1.0, b.abs().max().item()), rtol=0)


def _check_fsdp_bf16_generation(rank: int, model_dir: Path) -> None:
    """FSDP2 over fp32 weights computing in bf16: the cache is bf16, both ranks decode the same
    tokens, and they equal one device running the same model with its weights cast to bf16."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    cfg = ParallelConfig(dp_shard=2, mixed_precision={"param_dtype": "bfloat16"})
    model = _sharded(model_dir, cfg, lora=False)
    caches = _recording_caches(model)
    out = _greedy(model, tokenizer)
    both: list = [None, None]
    dist.all_gather_object(both, out.token_ids)

    reference = load_hf(model_dir)
    for p in reference.parameters():  # what the policy casts: parameters, not the RoPE buffers
        p.data = p.data.to(torch.bfloat16)
    expected = _greedy(reference, tokenizer)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # resharded fp32 masters
    assert {k.dtype for k in caches[0].keys} == {torch.bfloat16}
    assert both[0] == both[1] == expected.token_ids
    # The same bf16 operations on both sides (equal in practice); allow bf16 rounding anyway.
    _close_logprobs(out.raw_logprobs, expected.raw_logprobs, eps=2.0**-8)


def test_generation_under_fsdp2_with_bf16_params(tiny_checkpoints):
    _spawn(_check_fsdp_bf16_generation, 2, tiny_checkpoints["llama"])


def _check_tp_generation_and_sync(rank: int, model_dir: Path) -> None:
    """TP=2 (one key/value head per rank) with LoRA: greedy decoding equals one device, and the
    sharded model's HF tensors streamed into a plain engine make it generate the same."""
    from transformers import AutoTokenizer

    from posttrain.parallel.export import iter_hf_tensors_for_sync
    from posttrain.rollout import NativeEngine, SamplingParams

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = _sharded(model_dir, ParallelConfig(dp_shard=1, tp=2), lora=True)
    caches = _recording_caches(model)
    out = _greedy(model, tokenizer)
    engine = NativeEngine(load_hf(model_dir), tokenizer)  # base weights, adapters not merged in
    before = engine.generate(GEN_PROMPTS, SamplingParams(temperature=0, max_new_tokens=GEN_TOKENS))
    engine.update_weights(iter_hf_tensors_for_sync(model), version=3)
    synced = engine.generate(GEN_PROMPTS, SamplingParams(temperature=0, max_new_tokens=GEN_TOKENS))

    expected = _greedy(_reference(model_dir, lora=True), tokenizer)
    assert caches[0].keys[0].shape[1] == 1  # this rank's share of the 2 key/value heads
    assert out.token_ids == expected.token_ids
    _close_logprobs(out.raw_logprobs, expected.raw_logprobs, eps=64 * torch.finfo(torch.float32).eps)
    rows = [row[:n].tolist() for row, n in zip(synced.tokens, synced.lengths)]
    assert rows == expected.token_ids and synced.policy_version == 3
    assert before.tokens.tolist() != synced.tokens.tolist()


def test_generation_under_tp_and_weight_sync_from_shards(tiny_checkpoints):
    _spawn(_check_tp_generation_and_sync, 2, tiny_checkpoints["gemma3"])
