"""Preference optimisation: `posttrain dpo CONFIG [key=value ...]`.

The objective is a preference loss over packed chosen/rejected pairs (`train/preference.py`); the
reference log-probs come from a table computed before training (`precompute`), a frozen model run
beside the policy (`live`; under LoRA the policy with its adapters off), or nowhere (`none`, for
reference-free losses). Data and held-out evaluation are SFT's (`PackedDataRecipe`): the held-out
metrics are the objective's, so `eval/rewards/accuracies` is the held-out preference accuracy.
"""

from __future__ import annotations

import logging

from posttrain.cluster.dist_env import DistEnv
from posttrain.config.dpo import DPOConfig
from posttrain.recipes.common import PackedDataRecipe
from posttrain.train.objective import Objective
from posttrain.train.preference import PreferenceLoss, PreferenceObjective
from posttrain.train.reference import CachedReference, LiveReference, ReferenceTable
from posttrain.train.reference_cache import ReferencePass, fingerprint_inputs, stream_configs
from posttrain.train.roles import FrozenModel, build_reference, resolve_model_dir
from posttrain.train.trainer import TrainContext, TrainResult, train

logger = logging.getLogger("posttrain.dpo")


class DPORecipe(PackedDataRecipe):
    cfg: DPOConfig

    def objective(self, ctx: TrainContext) -> Objective:
        cfg, dpo = self.cfg, self.cfg.dpo
        loss = PreferenceLoss(dpo.loss, dpo.beta, dpo.label_smoothing, dpo.gamma, dpo.sft_weight)
        chunks = {"chunk_size": cfg.train.chunk_size, "vocab_chunk_size": cfg.train.vocab_chunk_size}
        reference = None
        if dpo.reference == "live":
            reference = LiveReference(self._reference_role(ctx), **chunks)
        elif dpo.reference == "precompute":
            reference = CachedReference(self._precomputed(ctx))
        return PreferenceObjective(loss, reference, **chunks)

    def _reference_role(self, ctx: TrainContext) -> FrozenModel:
        return build_reference(self.cfg.reference_model, ctx.model, lora=self.cfg.lora.enabled,
                               policy_dir=ctx.model_dir, device=ctx.env.device, mesh=ctx.mesh,
                               parallel_cfg=self.cfg.parallel)

    def _precomputed(self, ctx: TrainContext) -> ReferenceTable:
        cfg = self.cfg
        role = cfg.reference_model
        reference_dir = ctx.model_dir if role.path is None else resolve_model_dir(role.path)
        inputs = fingerprint_inputs(cfg.data, cfg.eval.sources, tokenizer_dir=ctx.model_dir,
                                    reference_dir=reference_dir, reference_dtype=role.dtype,
                                    precision=cfg.train.precision)
        cache = ReferencePass(cfg.run_dir, inputs, rank=ctx.env.rank, device=ctx.env.device, stop=ctx.stop)
        if cache.complete:
            table = cache.table()
            if ctx.env.is_main:
                logger.info("reference log-probs: reusing %s (%d pairs)", cache.directory, len(table))
            return table
        if ctx.env.is_main:
            logger.info("reference log-probs: one pass over the data into %s", cache.directory)
        cache.run(list(stream_configs(cfg.data, cfg.eval.sources)), lambda: self._reference_role(ctx),
                  tokenizer=ctx.tokenizer, batch_size=cfg.train.micro_batch_size, dp_rank=ctx.dp.rank,
                  dp_size=ctx.dp.size, precision=cfg.train.precision, **{
                      "chunk_size": cfg.train.chunk_size, "vocab_chunk_size": cfg.train.vocab_chunk_size})
        table = cache.table()
        if ctx.env.is_main:
            logger.info("reference log-probs: %d pairs stored", len(table))
        return table


def run_dpo(cfg: DPOConfig, env: DistEnv | None = None, attempt: int = 0) -> TrainResult:
    """Train as configured on this rank; resumes from the newest checkpoint when asked."""
    return train(DPORecipe(cfg), env, attempt)
