"""A frozen role sharded like the policy (FSDP2, TP) on 2 gloo ranks equals the one-device model,
computes in its own dtype whatever the policy's mixed-precision policy, and is sharded again
after use."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from posttrain.config import FrozenModelConfig
from posttrain.config.parallel import ParallelConfig
from posttrain.data.batch import IGNORE_INDEX
from posttrain.models.hf import load_hf
from posttrain.ops import linear_logprobs
from posttrain.parallel.mesh import build_mesh
from posttrain.train.roles import build_frozen
from tests.unit.parallel.test_parallel import _spawn

CASES = [("qwen2", 2, 1), ("qwen3", 1, 2)]  # family, dp_shard, tp


def _check_frozen(rank: int, dirs: dict[str, Path]) -> None:
    policy_precision = {"param_dtype": "bfloat16", "reduce_dtype": "float32"}  # not the frozen role's
    for family, dp, tp in CASES:
        cfg = ParallelConfig(dp_shard=dp, tp=tp, mixed_precision=policy_precision)
        frozen = build_frozen(FrozenModelConfig(), model_dir=dirs[family], device=torch.device("cpu"),
                              mesh=build_mesh(cfg, 2), parallel_cfg=cfg)
        assert all(isinstance(p, DTensor) and not p.requires_grad for p in frozen.model.parameters())
        reference = load_hf(dirs[family])
        ids = torch.randint(0, 250, (2, 12), generator=torch.Generator().manual_seed(3))
        labels = torch.cat([ids[:, 1:], torch.full((2, 1), IGNORE_INDEX)], 1)
        with frozen.active() as model:
            hidden = model(ids)
            assert hidden.dtype == torch.float32 and not hidden.requires_grad
            got = linear_logprobs(hidden, model.head_weight, labels, vocab_size=model.vocab_size)
        with torch.no_grad():
            want = linear_logprobs(reference(ids), reference.head_weight, labels, vocab_size=reference.vocab_size)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()), msg=family)
        assert isinstance(frozen.model.tok_embeddings.weight, DTensor), "resharded after use"


def test_sharded_frozen_role_equals_one_device(tiny_checkpoints):
    _spawn(_check_frozen, 2, {f: tiny_checkpoints[f] for f, _, _ in CASES})
