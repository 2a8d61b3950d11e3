"""The RL controller: rollout -> rewards -> advantages -> training samples, one step at a time.

It is the recipe's loader (`Loader` plus `next_step`): the trainer asks it for each optimiser
step's micro-batches and runs the update itself. When no step of the current rollout is left it
makes a new one:

    sync      the trainer's weights (HF-named, LoRA merged, gathered from shards) -> engine,
              versioned by the optimiser steps taken; every rollout carries that version
    generate  n samples of each of this rank's prompts (the engine wakes, then sleeps again)
    reward    reward workers score every sample; overlong penalty; group advantages
    filter    dynamic sampling drops groups with equal rewards and draws more (up to a limit);
              overlong filtering leaves truncated samples out
    teacher   on-policy distillation (`teacher_reverse_kl`): a frozen teacher scores every sampled
              token; its advantage is log p_teacher - log p_engine
    old       with more than one update per rollout, a no-grad pass of the trainer stores each
              token's log-prob before the first update (`old_logprobs`)

The rollout is split by groups into `minibatches` steps, repeated `epochs` times. What remains of
a rollout is part of `state_dict()`, so a resumed run continues with the same samples. With
`overlap` (rollout.async) the next rollout's draw/generate/reward/advantages run in a background
thread while the trainer updates (`rl/ahead.py`); the collective part runs when it is taken.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from posttrain.data.batch import IGNORE_INDEX, PackedBatch, Sample, samples_from_dicts, samples_to_dicts
from posttrain.models.sampling import SamplingParams
from posttrain.parallel.export import iter_hf_tensors_for_sync
from posttrain.parallel.mesh import DataParallel
from posttrain.rl.advantages import constant_groups, group_advantages
from posttrain.rl.ahead import Produced, RolloutAhead
from posttrain.rl.prompts import Prompt, PromptStream
from posttrain.rl.rewards.workers import RewardBatch, RewardWorkers
from posttrain.rl.rollout_metrics import RolloutStats
from posttrain.rl.samples import ROLLOUT_FIELDS, micro_batches, pack, rollout_sample, with_field
from posttrain.rollout.engine import GenerationEngine, RolloutBatch
from posttrain.rollout.process_engine import EngineDied
from posttrain.train.reference import token_logprobs
from posttrain.train.roles import FrozenModel
from posttrain.train.step import autocast_context

logger = logging.getLogger("posttrain.rl")

MAX_EMPTY_ROLLOUTS = 8


@dataclass(frozen=True)
class RolloutPlan:
    prompts_per_step: int
    n: int
    sampling: SamplingParams
    seed: int
    advantage: str
    minibatches: int = 1
    epochs: int = 1
    dynamic_sampling: bool = False
    max_rounds: int = 1
    overlong: str = "none"  # none | filter | penalty
    overlong_buffer: int = 0
    overlong_penalty: float = 1.0
    row_length: int = 512
    rows_per_batch: int = 1
    precision: str = "fp32"
    chunk_size: int = 1024
    vocab_chunk_size: int = 1024
    lm_head_fp32: bool = False
    overlap: bool = False  # rollout.async: the next rollout generates while this one trains

    @property
    def needs_old_logprobs(self) -> bool:
        return self.minibatches * self.epochs > 1


class RolloutController:
    def __init__(self, plan: RolloutPlan, *, prompts: PromptStream, engine: GenerationEngine,
                 rewards: RewardWorkers, policy: nn.Module, dp: DataParallel, device: torch.device, pad_id: int,
                 teacher: FrozenModel | None = None):
        if plan.prompts_per_step % dp.size:
            raise ValueError(f"rollout.prompts_per_step ({plan.prompts_per_step}) must be a multiple of the "
                             f"data-parallel ranks ({dp.size})")
        self.plan, self.prompts, self.engine, self.rewards = plan, prompts, engine, rewards
        self.policy, self.dp, self.device, self.pad_id = policy, dp, device, pad_id
        if (plan.advantage == "teacher_reverse_kl") != (teacher is not None):
            raise ValueError("advantage teacher_reverse_kl goes with a teacher, and a teacher with it")
        self.teacher = teacher
        self.version = 0  # optimiser steps taken: the policy version the next rollout is made with
        self.rollouts = 0
        self._pending: list[list[Sample]] = []  # the current rollout's steps still to run
        self._synced: int | None = None  # the version the engine holds (None: unknown)
        self._stats: dict[str, float] = {}
        self._rollout_version = 0  # the policy version of the rollout being trained on
        self.engine_restarts = 0  # engine processes restarted by this controller
        self.fields = ROLLOUT_FIELDS + (("old_logprobs",) if plan.needs_old_logprobs else ())
        if plan.overlap and plan.dynamic_sampling and dp.size > 1:
            raise ValueError("rollout.async with dynamic sampling needs one data-parallel rank (the ranks "
                             "agree on the refill rounds through collectives, which a background rollout cannot run)")
        self.ahead = RolloutAhead(self._generate) if plan.overlap else None

    # ---- the Loader surface ---------------------------------------------------------------------

    @property
    def counters(self):
        return self.prompts.counters

    @property
    def epoch(self) -> int:
        return self.prompts.epoch

    def __iter__(self):
        raise TypeError("the RL controller hands out whole steps (next_step), not a stream of batches")

    def next_step(self) -> list[PackedBatch]:
        """The micro-batches of the next optimiser step ([] once the prompts have run out)."""
        empty = 0
        while not self._pending:
            if not self._rollout():
                return []
            empty += not self._pending
            if empty == MAX_EMPTY_ROLLOUTS:
                raise RuntimeError(f"{empty} rollouts in a row left no sample to train on (every completion "
                                   "cut by rollout.max_new_tokens under grpo.overlong.mode: filter?)")
        samples = self._pending.pop(0)
        rows = pack(samples, self.plan.row_length, seed=self.version)
        self._stats["rollout/policy_lag"] = float(self.version - self._rollout_version)
        self.version += 1
        batches = micro_batches(rows, rows_per_batch=self.plan.rows_per_batch, row_length=self.plan.row_length,
                                pad_id=self.pad_id, field_names=self.fields, group=self.dp.group, device=self.device)
        if self.ahead is not None:
            self.ahead.release()  # the step is out: a rewind from here on is the trainer's, not ours
        return batches

    def step_metrics(self) -> dict[str, float]:
        """The rollout's metrics, reported once, with the first step it feeds."""
        stats, self._stats = self._stats, {}
        return stats

    def state_dict(self) -> dict[str, Any]:
        """The loader state of a checkpoint; waits for a rollout generating ahead and keeps it."""
        return self._state(join=True)

    def position(self) -> dict[str, Any]:
        """A cheap snapshot for rewinding a step: it does not wait for a rollout generating ahead
        but names it, so a rewind in this process keeps it (`RolloutAhead.rewind`)."""
        return self._state(join=False)

    def _state(self, join: bool) -> dict[str, Any]:
        ahead = self.ahead.state(join, self._regenerate) if self.ahead is not None else {}
        state = {"prompts": ahead.get("prompts") or self.prompts.snapshot(), "version": self.version,
                 "rollouts": self.rollouts, "rollout_version": self._rollout_version,
                 "pending": samples_to_dicts(self._pending), "ahead": ahead.get("ready")}
        if not join and self.ahead is not None:  # a rewind point of this process, never saved
            state.update(ahead_token=ahead["token"], ahead_owner=ahead["owner"])
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        prompts = state["prompts"]
        if self.ahead is not None and state.get("ahead_owner") == id(self.ahead):
            restore_position, instead = self.ahead.rewind(state.get("ahead_token"))
            prompts = prompts if restore_position else instead
        elif self.ahead is not None:
            self.ahead.restore(state.get("ahead"))
        elif state.get("ahead") is not None:
            raise ValueError("the checkpoint holds a rollout generated ahead (rollout.async: true); "
                             "resume it with rollout.async: true")
        if prompts is not None:
            self.prompts.restore(prompts)
        self.version, self.rollouts = int(state["version"]), int(state["rollouts"])
        self._rollout_version = int(state["rollout_version"])
        self._pending = samples_from_dicts(state["pending"])
        self._synced = None

    def close(self) -> None:
        if hasattr(self.engine, "close"):
            self.engine.close()  # first: a rollout in flight then ends at once
        if self.ahead is not None:
            self.ahead.close()
        self.rewards.close()

    # ---- one rollout -------------------------------------------------------------------------------

    def _rollout(self) -> bool:
        """Make the next rollout's steps (none when it left no sample); False once prompts ran out.
        With `overlap` the rollout generated ahead is taken, and once its steps are made the next
        one starts (held until the step is handed out, so a rewind can give it back)."""
        started = time.perf_counter()
        produced = self.ahead.take(self._regenerate) if self.ahead is not None else None
        if produced is None:
            produced = self._produce_now()
            if self.ahead is not None:
                self.ahead.hold(produced)
        if not self._finish(produced, started):
            return False
        if self.ahead is not None:
            stats = RolloutStats()
            self._sync(stats)  # on this thread: gathering sharded weights is collective
            self.ahead.start(stats, self.version, self.prompts.snapshot())
        return True

    def _produce_now(self) -> Produced:
        stats = RolloutStats()
        self._sync(stats)
        return self._generate(stats, self.version)

    def _regenerate(self, prompts_before: dict) -> Produced:
        """The engine died while generating ahead: restart it and make that rollout again, from
        the same prompts, with the current weights."""
        logger.warning("the engine died while generating ahead; restarting it and generating again")
        self.prompts.restore(prompts_before)
        self._restart_engine()
        return self._produce_now()

    def _finish(self, produced: Produced, started: float) -> bool:
        """The collective part of a rollout, on the trainer's thread: agree whether any rank has
        groups, the teacher's and the old log-probs, the steps, the global metrics."""
        plan, stats, groups = self.plan, produced.stats, produced.groups
        if not _any_rank(bool(groups), self.dp.group, self.device):
            if stats.groups == 0:
                return False  # the prompts ran out
            # Every group of every round had equal rewards: train on the last round's (advantage 0,
            # no gradient from the policy term) rather than loop for ever.
            groups = [g for g in produced.dropped if g][: plan.prompts_per_step // self.dp.size]
        if self.teacher is not None:
            t0 = time.perf_counter()
            groups = self._teacher_advantages(groups, stats)
            stats.seconds["teacher"] = time.perf_counter() - t0
        steps = split(groups, plan.minibatches) * plan.epochs
        if not _any_rank(bool(groups), self.dp.group, self.device):
            steps = []
        if plan.needs_old_logprobs:
            t0 = time.perf_counter()
            steps = [self._with_old_logprobs(step, i) for i, step in enumerate(steps)]
            stats.seconds["old_logprobs"] = time.perf_counter() - t0
        self._pending = steps
        self.rollouts += 1
        stats.seconds["rollout"] = time.perf_counter() - started
        self._stats = stats.reduce(self.dp.group, self.device)
        self._rollout_version = produced.version
        return True

    def _sync(self, stats: RolloutStats) -> None:
        t0 = time.perf_counter()
        self._engine(stats, self._push_weights)
        stats.seconds["sync"] = time.perf_counter() - t0

    def _push_weights(self) -> None:
        self.engine.wake()
        if self._synced != self.version:
            self.engine.update_weights(iter_hf_tensors_for_sync(self.policy), version=self.version)
            self._synced = self.version

    def _restart_engine(self) -> None:
        if self.dp.size > 1:
            raise RuntimeError("the engine died on one of several data-parallel ranks: pushing the weights to a "
                               "fresh one gathers them collectively, which this rank cannot do alone; the run "
                               "fails here and launcher.max_restarts restarts the group from its newest checkpoint")
        self.engine.restart()
        self.engine_restarts += 1
        self._synced = None

    def _engine(self, stats: RolloutStats, request: Callable[[], Any]) -> Any:
        """`request()` to the engine; if the engine process died, restart it, push the weights
        again and repeat the request once (on the trainer's thread; a rollout generating ahead
        lets the death through, to be handled when it is taken)."""
        try:
            return request()
        except EngineDied as err:
            if self.ahead is not None and self.ahead.in_background():
                raise
            logger.warning("%s; restarting the engine and repeating the request", err)
            self._restart_engine()
            self._push_weights()
            return request()

    def _generate(self, stats: RolloutStats, version: int) -> Produced:
        """Rounds of generation until this rank holds its share of groups with signal (or the
        round limit). No collective runs here unless dynamic sampling refills (see `overlap`)."""
        plan = self.plan
        share = plan.prompts_per_step // self.dp.size
        groups: list[list[Sample]] = []
        dropped: list[list[Sample]] = []
        rounds = plan.max_rounds if plan.dynamic_sampling else 1
        for round_ in range(rounds):
            drawn = self.prompts.next(plan.prompts_per_step)  # every rank draws the global batch
            if not drawn:
                break
            mine = drawn[self.dp.rank :: self.dp.size][: share - len(groups)]
            kept, dropped = self._groups_of(mine, stats, version)
            groups += kept
            if round_ == rounds - 1 or not _any_rank(len(groups) < share, self.dp.group, self.device):
                break
        if not plan.overlap:  # colocated: free the engine's memory while the trainer runs
            self._engine(stats, lambda: self.engine.sleep(1))
        stats.engine_restarts = self.engine_restarts
        return Produced(groups, dropped, stats, version)

    def _groups_of(self, prompts: list[Prompt], stats: RolloutStats,
                   version: int) -> tuple[list[list[Sample]], list[list[Sample]]]:
        """(groups kept, groups dropped by dynamic sampling) of one generation round."""
        plan = self.plan
        t0 = time.perf_counter()
        batch = self._engine(stats, lambda: self.engine.generate(
            [p.ids for p in prompts], plan.sampling, n=plan.n, seed=plan.seed,
            prompt_index=[p.index for p in prompts])) if prompts else None
        stats.seconds["generate"] = stats.seconds.get("generate", 0.0) + time.perf_counter() - t0
        if batch is None:
            return [], []
        scores = self.rewards.score(reward_batch(prompts, batch, plan.n, plan.sampling.max_new_tokens))
        rewards = scores.total + overlong_penalty(batch, plan)
        stats.add_rollout(batch, scores, rewards, version)
        grouped = rewards.view(len(prompts), plan.n)
        distill = plan.advantage == "teacher_reverse_kl"  # per-token advantages come from the teacher
        advantages = torch.zeros_like(grouped) if distill else group_advantages(plan.advantage, grouped)
        constant = constant_groups(grouped)
        groups, dropped = [], []
        for g, prompt in enumerate(prompts):
            group: list[Sample] = []
            for s in range(g * plan.n, (g + 1) * plan.n):
                if plan.overlong == "filter" and batch.finish_reasons[s] == "length":
                    stats.filtered_samples += 1
                    continue
                length = int(batch.lengths[s])
                group.append(rollout_sample(prompt.ids, batch.tokens[s, :length].tolist(),
                                            batch.logprobs[s, :length].tolist(), float(advantages[g, s % plan.n]),
                                            group=prompt.index))
            if plan.dynamic_sampling and not distill and bool(constant[g]):
                stats.dropped_groups += 1
                dropped.append(group)
            elif group:
                groups.append(group)
        return groups, dropped

    def _with_old_logprobs(self, samples: list[Sample], index: int) -> list[Sample]:
        """The step's samples with the trainer's log-probs before any update of this rollout."""
        was_training = self.policy.training
        self.policy.eval()
        try:
            return self.score_tokens(samples, self.policy, "old_logprobs", seed=self.version + index)
        finally:
            self.policy.train(was_training)

    def _teacher_advantages(self, groups: list[list[Sample]], stats: RolloutStats) -> list[list[Sample]]:
        """On-policy distillation: each sampled token's advantage is log p_teacher - log p_engine."""
        flat = [s for g in groups for s in g]
        with self.teacher.active() as teacher:
            scored = self.score_tokens(flat, teacher, "teacher_logprobs", seed=self.version)
        out = iter(distilled(s, stats) for s in scored)
        return [[next(out) for _ in g] for g in groups]

    @torch.no_grad()
    def score_tokens(self, samples: list[Sample], model: nn.Module, name: str, seed: int) -> list[Sample]:
        """`samples` (same order) with `model`'s log-prob of every sampled token as field `name`."""
        plan = self.plan
        rows = pack(samples, plan.row_length, seed=seed)
        batches = micro_batches(rows, rows_per_batch=plan.rows_per_batch, row_length=plan.row_length,
                                pad_id=self.pad_id, field_names=ROLLOUT_FIELDS, group=self.dp.group,
                                device=self.device)
        scored: dict[int, Sample] = {}
        for i, batch in enumerate(batches):
            chunk = rows[i * plan.rows_per_batch : (i + 1) * plan.rows_per_batch]
            with autocast_context(plan.precision, self.device.type):
                values = token_logprobs(model, batch.to(self.device), chunk_size=plan.chunk_size,
                                        vocab_chunk_size=plan.vocab_chunk_size,
                                        temperature=plan.sampling.temperature,
                                        matmul_dtype=torch.float32 if plan.lm_head_fp32 else None)
            for original, new in zip((s for row in chunk for s in row),
                                     (s for row in with_field(chunk, values.cpu(), name) for s in row)):
                scored[id(original)] = new
        return [scored[id(s)] for s in samples]


def distilled(sample: Sample, stats: RolloutStats) -> Sample:
    """`sample` with advantages `teacher - rollout` on its sampled tokens (the teacher field dropped);
    adds the sample's reverse-KL estimate (sum of rollout - teacher) to `stats`."""
    fields = dict(sample.fields)
    teacher, rollout = fields.pop("teacher_logprobs"), fields["rollout_logprobs"]
    scored = [label != IGNORE_INDEX for label in sample.labels]
    fields["advantages"] = [t - r if on else 0.0 for t, r, on in zip(teacher, rollout, scored)]
    stats.add_teacher_gap(sum(r - t for t, r, on in zip(teacher, rollout, scored) if on), sum(scored))
    return Sample(sample.input_ids, sample.labels, sample.weights, fields, sample.group)


def split(groups: list[list[Sample]], parts: int) -> list[list[Sample]]:
    """`parts` steps of whole groups, as even in group count as possible, in order."""
    bounds = [round(i * len(groups) / parts) for i in range(parts + 1)]
    return [[s for g in groups[a:b] for s in g] for a, b in zip(bounds[:-1], bounds[1:])]


def reward_batch(prompts: list[Prompt], batch: RolloutBatch, n: int, max_new_tokens: int) -> RewardBatch:
    count = len(batch)
    return RewardBatch(
        prompts=[prompts[i // n].text for i in range(count)],
        completions=list(batch.texts),
        references=[prompts[i // n].reference for i in range(count)],
        metadata=[{"num_tokens": int(batch.lengths[i]), "finish_reason": batch.finish_reasons[i],
                   "max_new_tokens": max_new_tokens} for i in range(count)],
    )


def overlong_penalty(batch: RolloutBatch, plan: RolloutPlan) -> torch.Tensor:
    """DAPO's soft overlong punishment: 0 up to `max_new_tokens - buffer` tokens, then falling
    linearly to `-penalty` at `max_new_tokens` (penalty mode only)."""
    if plan.overlong != "penalty":
        return torch.zeros(len(batch), dtype=torch.float64)
    start = plan.sampling.max_new_tokens - plan.overlong_buffer
    over = (batch.lengths.double() - start).clamp(min=0)
    return -plan.overlong_penalty * (over / plan.overlong_buffer).clamp(max=1.0)


def _any_rank(flag: bool, group: dist.ProcessGroup | None, device: torch.device) -> bool:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        value = torch.tensor([int(flag)], device=device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
        return bool(value)
    return flag
