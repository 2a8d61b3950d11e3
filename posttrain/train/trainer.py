"""The training loop, written once for every recipe (SPMD: every rank runs `train`).

A recipe supplies what differs between workflows and nothing else:

    class MyRecipe:                       # satisfies `Recipe`
        cfg: RecipeConfig
        def objective(self, ctx) -> Objective                      # loss + metrics per micro-batch
        def loader(self, ctx, *, counting=False) -> Loader         # PackedBatches (stateful)
        def evaluators(self, ctx, objective) -> list[Evaluator]    # held-out metrics

    result = train(MyRecipe(cfg), env, attempt)

`train` owns the rest: the run directory's lock and resolved config, tokenizer and the trainable
model (`roles.build_trainable`), optimiser and schedule, resume from the newest intact checkpoint
(`resume.py`: checksums, config drift), the step (`step.train_step`), metrics and tracking,
periodic evaluation, checkpoint timing, SIGTERM/SIGINT (a stop during data loading, evaluation,
export or set-up ends the run at once, otherwise at the step boundary; the last finished step is
checkpointed), the final checkpoint and evaluation, and export.
"""

from __future__ import annotations

import logging
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh

from posttrain.cluster.dist_env import DistEnv, destroy_distributed, init_distributed
from posttrain.config import RecipeConfig, config_hash, save_resolved
from posttrain.data.skips import DataQualityError, empty_data_message
from posttrain.parallel.mesh import DataParallel, data_parallel, mesh_for_run
from posttrain.tracking import Tracker
from posttrain.tracking.logs import enable_console_logging
from posttrain.train.checkpoint import AppState, save_checkpoint
from posttrain.train.export import export_run
from posttrain.train.flops import peak_for_precision
from posttrain.train.meter import StepMeter, compile_seconds
from posttrain.train.objective import Objective
from posttrain.train.optim import build_optimizer
from posttrain.train.resume import ResumePoint, choose_checkpoint, load_resume_point
from posttrain.train.roles import build_trainable, load_tokenizer, resolve_model_dir
from posttrain.train.run_dir import hold_run_dir
from posttrain.train.schedules import build_scheduler
from posttrain.train.signals import StopFlag, StopRequested, install_stop_handler
from posttrain.train.step import train_step

logger = logging.getLogger("posttrain.train")


@dataclass
class TrainResult:
    run_dir: str
    steps: int
    status: str  # "finished", "stopped" (signal) or "data_exhausted"
    losses: list[float] = field(default_factory=list)  # per step run by this process
    eval: dict[str, float] = field(default_factory=dict)  # last evaluation
    export_dir: str | None = None


@dataclass
class TrainContext:
    """What the trainer has built, handed to the recipe's factories."""

    cfg: RecipeConfig
    env: DistEnv
    mesh: DeviceMesh | None
    dp: DataParallel
    model_dir: Path
    tokenizer: Any
    model: nn.Module | None = None
    stop: StopFlag | None = None  # long set-up work (a reference pass) checks it


class Loader(Protocol):
    """`posttrain.data.DataLoader`'s surface the trainer uses."""

    counters: Any
    epoch: int

    def __iter__(self): ...
    def state_dict(self) -> dict: ...
    def position(self) -> dict: ...  # cheap live snapshot that load_state_dict accepts
    def load_state_dict(self, state: dict) -> None: ...
    def close(self) -> None: ...


class StepLoader(Loader, Protocol):
    """A loader that composes each optimiser step itself (RL: one minibatch of a rollout, made
    after the previous update) instead of the trainer grouping a stream of micro-batches.
    `step_metrics()` returns metrics to log with the step just handed out (may be empty)."""

    def next_step(self) -> list: ...  # [] once the data has ended
    def step_metrics(self) -> dict[str, float]: ...


class Evaluator(Protocol):
    def run(self, model: nn.Module, step: int) -> dict[str, float]: ...


class Recipe(Protocol):
    cfg: RecipeConfig

    def objective(self, ctx: TrainContext) -> Objective: ...
    def loader(self, ctx: TrainContext, *, counting: bool = False) -> Loader: ...
    def evaluators(self, ctx: TrainContext, objective: Objective) -> list[Evaluator]: ...


class StepBatches:
    """Groups the loader's micro-batches into optimiser steps; remembers when the data ended."""

    def __init__(self, loader: Loader, per_step: int, device: torch.device):
        self.loader, self.per_step, self.device = loader, per_step, device
        self.exhausted = False
        self._boundary: dict | None = None

    def next_step(self) -> list:
        self._boundary = self.loader.position()
        if hasattr(self.loader, "next_step"):  # a StepLoader
            batches = [b.to(self.device) for b in self.loader.next_step()]
            self.exhausted = not batches
            self._boundary = None
            return batches
        batches = []
        for batch in self.loader:
            batches.append(batch.to(self.device))
            if len(batches) == self.per_step:
                break
        else:
            self.exhausted = True
        self._boundary = None
        return batches

    def rewind(self) -> None:
        """After a stop inside `next_step`: give back the micro-batches of the unfinished step."""
        if self._boundary is not None:
            self.loader.load_state_dict(self._boundary)
            self._boundary = None


@dataclass
class _Run:
    """Everything one run holds while the loop turns."""

    recipe: Recipe
    ctx: TrainContext
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loader: Loader
    app_state: AppState
    counters: dict[str, Any]
    total_steps: int
    per_step: int
    start_step: int
    objective: Objective
    meter: StepMeter
    evaluators: list[Evaluator]
    stop: StopFlag
    tracker: Tracker
    result: TrainResult
    last_saved: int = 0  # the step of the newest checkpoint of this run (0: none)

    @property
    def cfg(self) -> RecipeConfig:
        return self.recipe.cfg


def train(recipe: Recipe, env: DistEnv | None = None, attempt: int = 0) -> TrainResult:
    """Run `recipe` on this rank; resumes from the newest intact checkpoint when the config asks.

    Without `env` (a plain in-process call) a world of one is formed for the run and torn down
    after it; a launcher passes the `env` of the group it owns.
    """
    if env is None:
        owns_group = not (dist.is_available() and dist.is_initialized())
        env = init_distributed()
        try:
            return train(recipe, env, attempt)
        finally:
            if owns_group:
                destroy_distributed()
    enable_console_logging()
    lock = hold_run_dir(recipe.cfg.run_dir, env, attempt)
    stop = install_stop_handler(allow_interrupt=env.world_size == 1)
    try:
        try:
            with stop.interruptible():
                run = _build(recipe, env, attempt, stop)
        except StopRequested:
            return TrainResult(run_dir=str(recipe.cfg.run_dir), steps=0, status="stopped")
        with ExitStack() as stack:  # each is closed, in reverse order, even when another's close raises
            stack.callback(run.loader.close)
            stack.callback(run.tracker.close)
            stack.callback(run.objective.close)
            _loop(run)
            if run.result.status != "stopped":
                _finish(run)
        return run.result
    finally:
        stop.restore()
        if lock is not None:
            lock.release()


def _context(cfg: RecipeConfig, env: DistEnv) -> TrainContext:
    run_dir = Path(cfg.run_dir)
    if env.is_main:
        save_resolved(cfg, run_dir / "config.yaml")
    model_dir = resolve_model_dir(cfg.model.path)
    tokenizer = load_tokenizer(model_dir, cfg.model.trust_remote_code)
    mesh = mesh_for_run(cfg.parallel, env.world_size, env.device)
    return TrainContext(cfg, env, mesh, data_parallel(mesh), model_dir, tokenizer)


def count_steps(recipe: Recipe, ctx: TrainContext, per_step: int) -> int:
    """Optimiser steps one pass of the configured epochs gives on this rank (renders the data once).

    Raises `DataQualityError` when the data gives no batch at all."""
    loader = recipe.loader(ctx, counting=True)
    try:
        batches = sum(1 for _ in loader)
        counters = loader.counters
    finally:
        loader.close()
    if batches == 0:
        raise DataQualityError(empty_data_message(counters))
    return -(-batches // per_step)


def _build(recipe: Recipe, env: DistEnv, attempt: int, stop: StopFlag) -> _Run:
    cfg = recipe.cfg
    torch.manual_seed(cfg.train.seed + env.rank)
    point = choose_checkpoint(cfg, env.device, env.world_size)  # verified, config-checked, before the model
    ctx = _context(cfg, env)
    ctx.stop = stop
    model = ctx.model = build_trainable(cfg.model, cfg.lora, cfg.parallel, model_dir=ctx.model_dir,
                                        device=env.device, mesh=ctx.mesh, seed=cfg.train.seed)
    per_step = cfg.train.grad_accum_steps(cfg.data.max_length, ctx.dp.size)
    total_steps = cfg.train.steps if cfg.train.steps is not None else count_steps(recipe, ctx, per_step)
    optimizer = build_optimizer(model, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train, total_steps)
    # The MFU denominator, measured (and cached) before the loader starts engine or reward-worker
    # processes that would share the cores while it runs.
    peak_for_precision(cfg.train.precision, env.device.type)
    loader = recipe.loader(ctx)
    counters: dict[str, Any] = {"step": 0, "tokens": 0, "trained_tokens": 0, "restarts": attempt}
    app_state = AppState(model, optimizer, scheduler, loader, counters)
    if point is not None:
        point = load_resume_point(point, cfg, app_state, env.device, env.world_size)
        counters["restarts"] = attempt
        _announce_resume(point, counters, total_steps, env)
    start_step = int(counters["step"])
    objective = recipe.objective(ctx)
    try:
        meter = StepMeter(model, lora=cfg.lora.enabled, precision=cfg.train.precision, device=env.device,
                          tp=cfg.parallel.tp, frozen_forwards=getattr(objective, "frozen_forwards", 0),
                          frozen_models=getattr(objective, "frozen_models", ()),
                          unit=objective.normaliser)
        evaluators = recipe.evaluators(ctx, objective)
        hparams = {"config_hash": config_hash(cfg), "total_steps": total_steps}
        tracker = Tracker(cfg.run_dir, cfg.tracking, total_steps=total_steps, start_step=start_step,
                          run_name=cfg.name, hparams=hparams, rank=env.rank)
    except BaseException:
        objective.close()  # a remote teacher's process
        raise
    result = TrainResult(run_dir=str(cfg.run_dir), steps=start_step, status="finished")
    return _Run(recipe, ctx, model, optimizer, scheduler, loader, app_state, counters, total_steps, per_step,
                start_step, objective, meter, evaluators, stop, tracker, result, last_saved=start_step)


def _announce_resume(point: ResumePoint, counters: dict[str, Any], total_steps: int, env: DistEnv) -> None:
    if env.is_main:
        step = int(counters["step"])
        logger.info("resuming from %s (%s), %d steps done, %d to go", point.checkpoint.name,
                    point.checkpoint, step, max(0, total_steps - step))


def _evaluate(run: _Run, step: int) -> None:
    """Run the evaluators (an interruptible phase) and log their metrics."""
    metrics: dict[str, float] = {}
    with run.stop.interruptible():
        for evaluator in run.evaluators:
            metrics.update(evaluator.run(run.model, step))
    run.result.eval = metrics
    run.tracker.log(step, {f"eval/{k}": v for k, v in metrics.items()})


def _checkpoint(run: _Run, step: int) -> None:
    meta = {"config_hash": config_hash(run.cfg), "config": run.cfg.model_dump(mode="json"),
            "tokens": run.counters["tokens"], "trained_tokens": run.counters["trained_tokens"]}
    save_checkpoint(run.cfg.run_dir, step, run.app_state, meta, keep_last=run.cfg.checkpoint.keep_last)
    run.last_saved = step


def _one_step(run: _Run, micro: list) -> int:
    """Train on `micro`, advance the schedule and counters, log; returns the new step number."""
    cfg, device = run.cfg, run.ctx.env.device
    started, compiling = time.perf_counter(), compile_seconds()
    stats = train_step(run.model, run.optimizer, micro, run.objective, grad_clip=cfg.train.grad_clip,
                       precision=cfg.train.precision, device=device, dp_group=run.ctx.dp.group)
    lr = run.scheduler.get_last_lr()[0]
    run.scheduler.step()
    elapsed, compiling = time.perf_counter() - started, compile_seconds() - compiling
    step = run.result.steps + 1
    run.counters["step"] = step
    run.counters["tokens"] += stats.num_tokens
    run.counters["trained_tokens"] += stats.num_trained_tokens
    run.result.losses.append(stats.loss)
    run.result.steps = step
    if step % cfg.train.log_every == 0 or step == run.total_steps:
        run.tracker.log(step, run.meter.metrics(stats, micro, elapsed, lr, run.counters, run.loader, compiling))
    return step


def _stop(run: _Run) -> None:
    """End the run on a stop signal: the last finished step is saved (unless it already is)."""
    run.result.status = "stopped"
    if run.result.steps != run.last_saved:
        _checkpoint(run, run.result.steps)


def _loop(run: _Run) -> None:
    batches = StepBatches(run.loader, run.per_step, run.ctx.env.device)
    try:
        _turn(run, batches)
    except StopRequested:  # raised in an interruptible phase: data, evaluation
        batches.rewind()
        _stop(run)


def _turn(run: _Run, batches: StepBatches) -> None:
    cfg, device = run.cfg, run.ctx.env.device
    if run.evaluators and cfg.eval.at_start and run.start_step == 0:
        _evaluate(run, 0)
    step = run.start_step
    while step < run.total_steps:
        with run.stop.interruptible():
            micro = batches.next_step()
        if not micro:
            if step == 0:
                raise DataQualityError(empty_data_message(run.loader.counters))
            run.result.status = "data_exhausted"
            return
        step = _one_step(run, micro)
        if run.evaluators and cfg.eval.every_steps and step % cfg.eval.every_steps == 0:
            _evaluate(run, step)
        if cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0 and step < run.total_steps:
            _checkpoint(run, step)
        if run.stop.should_stop(device):
            _stop(run)
            return
        if batches.exhausted:
            run.result.status = "data_exhausted" if step < run.total_steps else "finished"
            return


def _finish(run: _Run) -> None:
    """Final checkpoint, evaluation (unless this step was just evaluated) and export; a stop
    signal ends it after the checkpoint (the evaluation and export are interruptible)."""
    cfg, result, env = run.cfg, run.result, run.ctx.env
    if cfg.checkpoint.save_at_end and result.steps > run.start_step and result.steps != run.last_saved:
        _checkpoint(run, result.steps)
    try:
        if run.stop.should_stop(env.device):
            raise StopRequested(run.stop.signal_name)
        every = cfg.eval.every_steps
        just_evaluated = every and result.steps % every == 0 and result.steps > run.start_step
        if run.evaluators and not just_evaluated:
            _evaluate(run, result.steps)
        if env.is_main or run.ctx.mesh is not None:  # a sharded model is gathered by every rank
            with run.stop.interruptible():
                export_dir = export_run(cfg.lora, run.model, run.ctx.model_dir, Path(cfg.run_dir), main=env.is_main)
            result.export_dir = str(export_dir) if env.is_main else None
    except StopRequested:
        result.status = "stopped"
