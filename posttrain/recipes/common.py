"""What the chat-data recipes (SFT, DPO) share: the packed training loader and the held-out
evaluation of the recipe's own objective; scored generation on held-out prompts (every recipe,
RL included, where the config asks)."""

from __future__ import annotations

from posttrain.config import RecipeConfig
from posttrain.data.loader import DataLoader, build_loader
from posttrain.evaluation.generation import GenerationEvaluator, held_out_prompts
from posttrain.evaluation.held_out import HeldOutEvaluator, held_out_batches
from posttrain.train.objective import Objective
from posttrain.train.trainer import Evaluator, TrainContext


class PackedDataRecipe:
    """Loader and evaluators from the `data:` and `eval:` sections; subclasses add `objective`."""

    def __init__(self, cfg: RecipeConfig):
        self.cfg = cfg

    def loader(self, ctx: TrainContext, *, counting: bool = False) -> DataLoader:
        data = self.cfg.data.model_copy(update={"prefetch": 0}) if counting else self.cfg.data
        return build_loader(data, ctx.tokenizer, batch_size=self.cfg.train.micro_batch_size, rank=ctx.dp.rank,
                            world_size=ctx.dp.size, seed=self.cfg.train.seed)

    def evaluators(self, ctx: TrainContext, objective: Objective) -> list[Evaluator]:
        cfg = self.cfg
        if not cfg.eval.enabled:
            return []
        batches = held_out_batches(cfg.data, cfg.eval.sources, ctx.tokenizer, batch_size=cfg.train.micro_batch_size,
                                   rank=ctx.dp.rank, world_size=ctx.dp.size, max_samples=cfg.eval.max_samples)
        evaluators: list[Evaluator] = [HeldOutEvaluator(batches, objective, precision=cfg.train.precision,
                                                        device=ctx.env.device, dp_group=ctx.dp.group)]
        return evaluators + generation_evaluators(cfg, ctx)


def generation_evaluators(cfg: RecipeConfig, ctx: TrainContext) -> list[Evaluator]:
    """Greedy answers to the held-out prompts scored by `eval.scorer` (none without one). A sharded
    model generates on every rank (its forward is collective); one rank otherwise."""
    if not (cfg.eval.enabled and cfg.eval.scorer and (ctx.env.is_main or ctx.mesh is not None)):
        return []
    return [GenerationEvaluator(
        ctx.tokenizer, held_out_prompts(cfg.eval.sources, cfg.eval.max_samples), cfg.eval.scorer,
        max_new_tokens=cfg.eval.max_new_tokens, repetition_penalty=cfg.eval.repetition_penalty,
        device=ctx.env.device, bf16_autocast=cfg.train.precision == "bf16_autocast",
        samples_dir=cfg.run_dir / "eval" if ctx.env.is_main else None,
    )]
