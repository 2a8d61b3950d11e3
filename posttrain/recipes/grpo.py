"""On-policy RL: `posttrain grpo CONFIG [key=value ...]`.

    prompts -> engine (n samples each) -> reward workers -> advantages -> trainer update -> sync
    (RolloutController, the recipe's loader)                 (the shared trainer loop)

The controller (`rl/controller.py`) makes each step's micro-batches; the objective
(`rl/objective.py`) is the clipped policy loss with the precision metrics; the trainer runs the
update, checkpoints (the controller's state included), evaluation and export like every recipe.
The held-out evaluation is scored generation (`eval.scorer`), the same code SFT uses.
"""

from __future__ import annotations

from pathlib import Path

from posttrain.cluster.dist_env import DistEnv
from posttrain.config.grpo import GRPOConfig
from posttrain.models.hf import load_hf
from posttrain.models.sampling import SamplingParams
from posttrain.data.chat import ChatRenderer
from posttrain.data.rows import PromptExample
from posttrain.evaluation.generation import held_out_prompts
from posttrain.recipes.common import generation_evaluators
from posttrain.rl.distill_eval import TeacherKLEvaluator
from posttrain.rl.controller import RolloutController, RolloutPlan
from posttrain.rl.objective import PolicyGradientObjective
from posttrain.rl.policy_loss import PolicyLossSettings
from posttrain.rl.prompts import PromptStream
from posttrain.rl.rewards.workers import RewardTerm, RewardWorkers
from posttrain.rollout.engine import GenerationEngine
from posttrain.rollout.native import NativeEngine
from posttrain.rollout.process_engine import ProcessEngine
from posttrain.rollout.vllm_engine import VLLMEngine
from posttrain.train.objective import Objective
from posttrain.train.reference import LiveReference
from posttrain.train.roles import (
    DTYPES,
    FrozenModel,
    build_reference,
    build_teacher,
)
from posttrain.train.trainer import Evaluator, TrainContext, TrainResult, train


def loss_settings(cfg: GRPOConfig) -> PolicyLossSettings:
    g = cfg.grpo
    return PolicyLossSettings(loss=g.loss, clip_low=g.clip_low, clip_high=g.clip_high, aggregation=g.aggregation,
                              beta=g.beta, kl=g.kl, correction=g.correction.mode,
                              correction_level=g.correction.level, correction_cap=g.correction.cap)


def rollout_plan(cfg: GRPOConfig) -> RolloutPlan:
    r, g = cfg.rollout, cfg.grpo
    sampling = SamplingParams(temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                              max_new_tokens=r.max_new_tokens)
    return RolloutPlan(
        prompts_per_step=r.prompts_per_step, n=r.n, sampling=sampling,
        seed=r.seed if r.seed is not None else cfg.train.seed, advantage=g.advantage,
        minibatches=g.minibatches, epochs=g.epochs, dynamic_sampling=g.dynamic_sampling.enabled,
        max_rounds=g.dynamic_sampling.max_rounds, overlong=g.overlong.mode, overlong_buffer=g.overlong.buffer,
        overlong_penalty=g.overlong.penalty, row_length=cfg.data.max_length,
        rows_per_batch=cfg.train.micro_batch_size, precision=cfg.train.precision,
        chunk_size=cfg.train.chunk_size, vocab_chunk_size=cfg.train.vocab_chunk_size, lm_head_fp32=r.lm_head_fp32,
        overlap=r.async_)


class GRPORecipe:
    def __init__(self, cfg: GRPOConfig):
        self.cfg = cfg

    def objective(self, ctx: TrainContext) -> Objective:
        cfg = self.cfg
        chunks = {"chunk_size": cfg.train.chunk_size, "vocab_chunk_size": cfg.train.vocab_chunk_size}
        reference = None
        if cfg.grpo.beta > 0:
            role = build_reference(cfg.reference_model, ctx.model, lora=cfg.lora.enabled, policy_dir=ctx.model_dir,
                                   device=ctx.env.device, mesh=ctx.mesh, parallel_cfg=cfg.parallel)
            reference = LiveReference(role, temperature=cfg.rollout.temperature, **chunks)
        return PolicyGradientObjective(loss_settings(cfg), temperature=cfg.rollout.temperature,
                                       reference=reference, lm_head_fp32=cfg.rollout.lm_head_fp32, **chunks)

    def loader(self, ctx: TrainContext, *, counting: bool = False) -> RolloutController:
        cfg = self.cfg
        teacher = self._teacher(ctx) if cfg.teacher is not None else None
        engine = self._engine(ctx)
        prompts = PromptStream(cfg.data, ctx.tokenizer, seed=cfg.train.seed,
                               max_prompt_tokens=cfg.data.max_length - cfg.rollout.max_new_tokens)
        terms = [RewardTerm(r.label, r.fn, r.weight, dict(r.kwargs)) for r in cfg.rewards]
        workers = cfg.reward_workers
        rewards = RewardWorkers(terms, processes=workers.processes, timeout_s=workers.timeout_s,
                                on_error=workers.on_error, backend=self._backend)
        self._controller = RolloutController(
            rollout_plan(cfg), prompts=prompts, engine=engine, rewards=rewards, policy=ctx.model, dp=ctx.dp,
            device=ctx.env.device, pad_id=engine.pad_id, teacher=teacher)
        return self._controller

    @property
    def _backend(self) -> str:
        return "ray" if self.cfg.launcher.backend == "ray" else "process"

    def _engine(self, ctx: TrainContext) -> GenerationEngine:
        """The native engine (in this process, a spawned process or a Ray actor) or vLLM (a
        process from its own environment, or in a Ray actor)."""
        rollout, dtype = self.cfg.rollout, self.cfg.engine_dtype
        if rollout.engine == "native" and not (rollout.process or rollout.placement == "separate"):
            return NativeEngine(load_hf(ctx.model_dir, device=ctx.env.device, dtype=DTYPES[dtype]), ctx.tokenizer,
                                lm_head_fp32=rollout.lm_head_fp32)
        if ctx.env.device.type != "cpu":
            raise ValueError(f"the {rollout.engine} engine runs in a process of its own on the CPU only for now; "
                             "set rollout.engine: native, rollout.process: false and rollout.placement: colocated")
        if self._backend == "ray":
            from posttrain.rollout.ray_engine import RayEngine

            return RayEngine(ctx.model_dir, dtype=dtype, lm_head_fp32=rollout.lm_head_fp32,
                             placement=rollout.placement, cpus=rollout.cpus, vllm=self._vllm_kwargs(ctx))
        if rollout.engine == "vllm":
            return VLLMEngine(ctx.model_dir, ctx.tokenizer, **self._vllm_kwargs(ctx))
        return ProcessEngine(ctx.model_dir, dtype=dtype, lm_head_fp32=rollout.lm_head_fp32)

    def _vllm_kwargs(self, ctx: TrainContext) -> dict | None:
        """VLLMEngine's settings (None for the native engine); its log goes to the run directory."""
        if self.cfg.rollout.engine != "vllm":
            return None
        v = self.cfg.rollout.vllm
        return {"dtype": self.cfg.engine_dtype, "max_model_len": self.cfg.data.max_length,
                "kv_cache_gib": v.kv_cache_gib, "threads": v.threads, "python": v.python,
                "local_rank": ctx.env.local_rank, "local_world_size": ctx.env.local_world_size,
                "seed": self.cfg.train.seed, "log_path": str(Path(self.cfg.run_dir) / f"vllm-engine-rank{ctx.env.rank}.log")}

    def _teacher(self, ctx: TrainContext) -> FrozenModel:
        return build_teacher(self.cfg.teacher, student_tokenizer=ctx.tokenizer, student_dir=ctx.model_dir,
                             device=ctx.env.device, mesh=ctx.mesh, parallel_cfg=self.cfg.parallel)

    def evaluators(self, ctx: TrainContext, objective: Objective) -> list[Evaluator]:
        cfg, evaluators = self.cfg, generation_evaluators(self.cfg, ctx)
        controller = self._controller
        if controller.teacher is not None and cfg.eval.enabled:
            renderer = ChatRenderer(ctx.tokenizer, special_tokens=cfg.data.special_tokens)
            prompts = [renderer.render_prompt(PromptExample(p.messages)).input_ids
                       for p in held_out_prompts(cfg.eval.sources, cfg.eval.max_samples)]
            evaluators.append(TeacherKLEvaluator(prompts, ctx.tokenizer, controller.teacher, controller.plan.sampling,
                                                 controller.score_tokens, seed=controller.plan.seed))
        return evaluators


def run_grpo(cfg: GRPOConfig, env: DistEnv | None = None, attempt: int = 0) -> TrainResult:
    """Train as configured on this rank; resumes from the newest checkpoint when asked."""
    return train(GRPORecipe(cfg), env, attempt)
