"""`GRPOConfig`: on-policy RL (`posttrain grpo CONFIG`).

The common recipe sections (`data:` holds prompt rows, `data.task: prompt`; `data.max_length` is
the row length that prompt plus completion must fit), plus:

    rollout:         the generation engine and how it samples
    grpo:            advantages, the policy loss, its corrections, dynamic sampling, overlong rule
    rewards:         weighted reward functions (built-in names or package.module:function)
    reward_workers:  where rewards run, their timeout and what a failure does
    reference_model: the frozen reference of the KL term (only loaded when grpo.beta > 0)
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import ConfigDict, Field, model_validator

from posttrain.config.base import FieldError, Section
from posttrain.config.model import FrozenModelConfig
from posttrain.config.recipe import RecipeConfig


class VLLMSettings(Section):
    """The vLLM engine (`rollout.engine: vllm`), a process of its own from the vLLM environment."""

    python: str | None = None
    """That environment's interpreter; null: $POSTTRAIN_VLLM_PYTHON, else `.venv-vllm/bin/python`
    of this checkout (`make vllm-env`)."""

    kv_cache_gib: int = Field(1, ge=1)
    """KV-cache memory vLLM reserves (VLLM_CPU_KVCACHE_SPACE on a CPU), kept while the trainer runs."""

    threads: int | None = Field(None, ge=1)
    """CPU cores vLLM's threads are bound to: the first `threads` of this rank's equal share of the
    node's usable cores; null: the whole share (vLLM's own default would keep one core idle)."""


class RolloutConfig(Section):
    model_config = ConfigDict(**Section.model_config, validate_by_name=True, validate_by_alias=True,
                              serialize_by_alias=True)  # `async` is a Python keyword: the field is async_

    engine: Literal["native", "vllm"] = "native"
    """native: our KV-cache decoder (in the trainer's process unless `process` or `separate`);
    vllm: vLLM in a process of its own from its own environment (`make vllm-env`; settings in
    `rollout.vllm`; CPU only for now)."""

    vllm: VLLMSettings = Field(default_factory=VLLMSettings)

    placement: Literal["colocated", "separate"] = "colocated"
    """colocated: the engine shares the trainer's devices (and sleeps while the trainer runs);
    separate: a Ray actor with `cpus` CPUs of its own (launcher.backend: ray)."""

    process: bool = False
    """Run the engine in a process of its own with its own copy of the weights (a spawned process;
    a Ray actor on the rank's node under launcher.backend: ray); the controller restarts it and
    repeats the request when it dies. Implied by placement: separate."""

    cpus: float = Field(1.0, gt=0)
    """CPUs reserved for the engine actor of `placement: separate` (one per data-parallel rank)."""

    async_: bool = Field(False, alias="async")
    """One-step off-policy overlap: rollout k+1 is generated (with the weights before update k)
    while step k trains; `rollout/policy_lag` says how stale each step's samples are, and
    `grpo.correction` weighs the gap. Pays off when the engine has devices of its own."""

    prompts_per_step: int = Field(8, ge=1)
    """Prompts drawn per rollout over all data-parallel ranks (a multiple of their number)."""

    n: int = Field(8, ge=2)
    """Samples per prompt (the group the advantages compare)."""

    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """The engine's weight dtype; auto: the policy's."""

    seed: int | None = None
    """Sampling seed (per rollout, prompt and sample); null: train.seed."""

    lm_head_fp32: bool = False
    """Run the LM head's matmul and softmax in fp32 in the engine and in the trainer's log-probs,
    whatever the weights' dtype or autocast (narrows the engine/trainer mismatch)."""


class DynamicSamplingConfig(Section):
    enabled: bool = False
    """Drop groups whose samples all got the same reward (no signal) and draw new prompts."""

    max_rounds: int = Field(3, ge=1)
    """Generation rounds per rollout at most (the first included); then train on what there is."""


class OverlongConfig(Section):
    mode: Literal["none", "filter", "penalty"] = "none"
    """filter: completions cut by max_new_tokens are left out of the loss; penalty: their reward
    falls linearly over the last `buffer` tokens before max_new_tokens (DAPO)."""

    buffer: int = Field(0, ge=0)
    penalty: float = Field(1.0, ge=0)
    """The reward taken off at max_new_tokens (penalty mode)."""


class CorrectionConfig(Section):
    mode: Literal["none", "tis", "mis"] = "none"
    """Importance correction for the engine/trainer mismatch: tis truncates w = pi_trainer /
    pi_engine at `cap`; mis leaves tokens (or sequences) with w > cap out."""

    level: Literal["token", "sequence"] = "token"
    cap: float = Field(2.0, gt=1)


class GRPOSection(Section):
    advantage: Literal["grpo", "dr_grpo", "rloo", "teacher_reverse_kl"] = "grpo"
    """teacher_reverse_kl: on-policy distillation, each sampled token's advantage is
    log p_teacher - log p_student (a dense reward); needs `teacher:`."""

    loss: Literal["ppo", "gspo"] = "ppo"
    """ppo: per-token clipped ratio; gspo: the sequence's geometric-mean ratio, clipped."""

    clip_low: float = Field(0.2, ge=0, lt=1)
    clip_high: float = Field(0.2, ge=0)
    """Upper clip range; DAPO's clip-higher uses 0.28."""

    aggregation: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"] = "token_mean"
    beta: float = Field(0.0, ge=0)
    """Weight of KL(policy || reference); 0 loads no reference."""

    kl: Literal["k1", "k3"] = "k3"
    minibatches: int = Field(1, ge=1)
    """Optimiser steps each rollout is split into (by groups)."""

    epochs: int = Field(1, ge=1)
    """Passes over each rollout."""

    dynamic_sampling: DynamicSamplingConfig = Field(default_factory=DynamicSamplingConfig)
    overlong: OverlongConfig = Field(default_factory=OverlongConfig)
    correction: CorrectionConfig = Field(default_factory=CorrectionConfig)


class RewardConfig(Section):
    fn: str
    """A built-in (math, addition, gsm8k, format, length) or package.module:function."""

    weight: float = 1.0
    name: str | None = None
    """Metric name; default: the built-in name or the function's."""

    kwargs: dict[str, Any] = Field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.name or self.fn.rpartition(":")[2]


class RewardWorkersConfig(Section):
    processes: int = Field(1, ge=0)
    """Worker processes (Ray actors on the rank's node under launcher.backend: ray); 0 scores in
    the controller without a timeout (trusted, quick functions)."""

    timeout_s: float = Field(60.0, gt=0)
    on_error: Literal["zero", "raise"] = "zero"
    """zero: a sample whose reward raises or times out gets 0 (counted in reward/errors)."""


class GRPOConfig(RecipeConfig):
    """On-policy RL over prompt rows with verifiable rewards."""

    RESUME_MUTABLE: ClassVar[tuple[str, ...]] = RecipeConfig.RESUME_MUTABLE + ("reward_workers",)

    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    grpo: GRPOSection = Field(default_factory=GRPOSection)
    rewards: list[RewardConfig] = Field(default_factory=list)
    """The reward; with `advantage: teacher_reverse_kl` optional (logged only)."""

    reward_workers: RewardWorkersConfig = Field(default_factory=RewardWorkersConfig)
    reference_model: FrozenModelConfig = Field(default_factory=FrozenModelConfig)
    teacher: FrozenModelConfig | None = None
    """The frozen teacher of on-policy distillation (same tokenizer as the policy)."""

    @property
    def engine_dtype(self) -> str:
        """The engine's weight dtype with `auto` resolved (the policy's; its `auto` is float32)."""
        if self.rollout.dtype != "auto":
            return self.rollout.dtype
        return "float32" if self.model.dtype == "auto" else self.model.dtype

    @model_validator(mode="after")
    def _check_rl(self) -> GRPOConfig:
        if self.data.task != "prompt":
            raise FieldError("data.task", f"{self.data.task!r}: RL reads prompt rows with a reference "
                             "answer; set data.task: prompt")
        if self.train.steps is None:
            raise FieldError("train.steps", "RL runs a fixed number of optimiser steps; set train.steps")
        if self.rollout.max_new_tokens >= self.data.max_length:
            raise FieldError("rollout.max_new_tokens", f"{self.rollout.max_new_tokens} leaves no room for "
                             f"the prompt in a row of data.max_length={self.data.max_length}")
        distill = self.grpo.advantage == "teacher_reverse_kl"
        if distill and (self.teacher is None or self.teacher.path is None):
            raise FieldError("teacher.path", "advantage teacher_reverse_kl distils from a teacher; set teacher.path")
        if not distill and self.teacher is not None:
            raise FieldError("teacher", f"a teacher is only read by advantage teacher_reverse_kl, not {self.grpo.advantage}")
        if not distill and not self.rewards:
            raise FieldError("rewards", "at least one reward function is needed (e.g. - fn: math)")
        labels = [r.label for r in self.rewards]
        if len(set(labels)) != len(labels):
            raise FieldError("rewards", f"reward names repeat ({labels}); give each a distinct name")
        if self.rollout.placement == "separate" and self.launcher.backend != "ray":
            raise FieldError("rollout.placement", "separate places the engine on Ray actors of its own; "
                             "set launcher.backend: ray (or placement: colocated)")
        if self.rollout.engine == "vllm" and self.rollout.lm_head_fp32 and self.engine_dtype != "float32":
            raise FieldError("rollout.lm_head_fp32", "vLLM computes the head in the engine's dtype "
                             f"({self.engine_dtype}); set rollout.dtype: float32 or rollout.engine: native")
        if self.grpo.overlong.mode == "penalty" and self.grpo.overlong.buffer == 0:
            raise FieldError("grpo.overlong.buffer", "the penalty mode needs a buffer of tokens > 0")
        return self
