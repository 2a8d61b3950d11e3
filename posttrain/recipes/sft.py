"""Supervised fine-tuning: `posttrain sft CONFIG [key=value ...]`.

The objective is next-token cross-entropy on the assistant tokens (`CausalLMObjective`), the data
the configured chat sources packed into rows, the evaluators the held-out loss and, with
`eval.scorer`, scored greedy answers (`PackedDataRecipe`). Everything else is the shared trainer
(`train/trainer.py`). `run_sft` is the SPMD entry every rank runs; `launch` starts it in-process
or on a Ray worker group.
"""

from __future__ import annotations

from posttrain.cluster.dist_env import DistEnv
from posttrain.config import SFTConfig
from posttrain.recipes.common import PackedDataRecipe
from posttrain.train.objective import Objective
from posttrain.train.objectives import CausalLMObjective
from posttrain.train.trainer import TrainContext, TrainResult, train


class SFTRecipe(PackedDataRecipe):
    cfg: SFTConfig

    def objective(self, ctx: TrainContext) -> Objective:
        return CausalLMObjective(self.cfg.train.chunk_size, self.cfg.train.vocab_chunk_size)


def run_sft(cfg: SFTConfig, env: DistEnv | None = None, attempt: int = 0) -> TrainResult:
    """Train as configured on this rank; resumes from the newest checkpoint when asked."""
    return train(SFTRecipe(cfg), env, attempt)
