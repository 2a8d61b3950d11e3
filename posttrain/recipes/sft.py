"""Supervised fine-tuning: `posttrain sft CONFIG [key=value ...]`.

The recipe wires components and holds no tensor math: data (`posttrain.data`), model
(`posttrain.models`), loss (`posttrain.train.objectives` over `posttrain.ops`), the step engine
(`posttrain.train.step`), checkpoints, tracking and export. `run_sft` is the SPMD entry every rank
runs; `launch` starts it in-process or on a Ray worker group.
"""

from __future__ import annotations

import functools
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh

from posttrain.cluster.dist_env import DistEnv, destroy_distributed, init_distributed
from posttrain.config import SFTConfig, config_hash, save_resolved
from posttrain.data.loader import DataLoader, build_loader
from posttrain.models import hub
from posttrain.models.hf import build_meta_model, load_hf, read_hf_config, save_hf
from posttrain.models.lora import apply_lora, lora_modules, merge_lora, save_peft_adapter
from posttrain.parallel.checkpointing import apply_activation_checkpointing
from posttrain.parallel.compile import apply_compile
from posttrain.parallel.export import gather_lora_adapters, save_hf_sharded
from posttrain.parallel.load import init_lora_adapters, is_distributed, load_sharded, lora_initializer
from posttrain.parallel.mesh import DataParallel, data_parallel, mesh_for_run
from posttrain.parallel.parallelize import parallelize_model
from posttrain.tracking import Tracker
from posttrain.train.checkpoint import AppState, find_resume_checkpoint, load_checkpoint, save_checkpoint
from posttrain.train.evaluation import generation_scores, held_out_batches, held_out_prompts
from posttrain.train.flops import LoraAdapter, TransformerShape, mfu, peak_for_precision, training_flops
from posttrain.train.objectives import causal_lm_loss, check_supported, document_lengths
from posttrain.train.optim import build_optimizer
from posttrain.train.schedules import build_scheduler
from posttrain.train.signals import install_stop_handler
from posttrain.train.step import eval_loss, train_step

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
WRAPPER_PREFIX = "_checkpoint_wrapped_module."


@dataclass
class SFTResult:
    run_dir: str
    steps: int
    status: str  # "finished", "stopped" (signal) or "data_exhausted"
    losses: list[float] = field(default_factory=list)  # per step run by this process
    eval: dict[str, float] = field(default_factory=dict)  # last evaluation
    export_dir: str | None = None


# ------------------------------------------------------------------------------------ building


def resolve_model_dir(path: str) -> Path:
    """A bundled model name is imported (once, cached); anything else is an HF directory."""
    return hub.import_model(path) if path in hub.BUNDLED else Path(path).expanduser()


def load_tokenizer(model_dir: Path, trust_remote_code: bool):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)


def build_model(cfg: SFTConfig, model_dir: Path, device: torch.device, mesh: DeviceMesh | None = None) -> nn.Module:
    """Load, adapt (LoRA), then apply TP, activation checkpointing, compile and FSDP, in that order.

    Without a mesh the model is loaded whole on `device`. With one it is built on `meta`,
    parallelised, and each rank reads only its own slices of the checkpoint.
    """
    dtype = DTYPES[cfg.model.dtype]
    if mesh is None:
        model = load_hf(model_dir, device=device, dtype=dtype, attention_backend=cfg.model.attention)
    else:
        source, args = read_hf_config(model_dir)
        model = build_meta_model(args, cfg.model.attention).to(dtype)
    check_supported(model)
    if cfg.lora.enabled:
        apply_lora(
            model,
            rank=cfg.lora.rank,
            alpha=cfg.lora.alpha,
            dropout=cfg.lora.dropout,
            target_modules=cfg.lora.target_modules,
            trainable_modules=cfg.lora.trainable_modules,
        )
    if mesh is not None:
        parallelize_model(model, mesh, cfg.parallel, activation_checkpointing=cfg.model.activation_checkpointing,
                          compile=cfg.model.compile)
        init = lora_initializer(model, cfg.train.seed) if cfg.lora.enabled else None
        return load_sharded(model, source, device, init_missing=init)
    if cfg.lora.enabled:
        init_lora_adapters(model, cfg.train.seed)  # the same adapters at every world size
    if cfg.model.activation_checkpointing:
        apply_activation_checkpointing(model)
    if cfg.model.compile:
        apply_compile(model)
    return model


def count_batches(cfg: SFTConfig, tokenizer, dp: DataParallel) -> int:
    """Batches one pass of the configured epochs yields on this rank (renders the data once)."""
    data = cfg.data.model_copy(update={"prefetch": 0})
    with build_loader(data, tokenizer, batch_size=cfg.train.micro_batch_size, rank=dp.rank,
                      world_size=dp.size, seed=cfg.train.seed) as loader:
        return sum(1 for _ in loader)


def _peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


# ------------------------------------------------------------------------------------ export


def _our_name(name: str) -> str:
    return name.replace(WRAPPER_PREFIX, "")


def export_model(cfg: SFTConfig, model: nn.Module, model_dir: Path, out: Path) -> Path:
    """`export/`: the merged model as an HF directory; with LoRA also `export/adapter/` (PEFT).

    A sharded model is gathered tensor by tensor: every rank calls this, rank 0 writes.
    """
    sharded = is_distributed(model)
    if cfg.lora.enabled:
        from posttrain.models.registry import spec_for_model_type

        spec = spec_for_model_type(model.hf_source.model_type)
        adapters = gather_lora_adapters(model) if sharded else model
        if not sharded or dist.get_rank() == 0:
            save_peft_adapter(
                adapters,
                out / "adapter",
                to_hf_name=lambda name: spec.key_map.to_hf(_our_name(name)),
                base_model_path=str(model_dir),
                rank=cfg.lora.rank,
                alpha=cfg.lora.alpha,
                dropout=cfg.lora.dropout,
            )
    if sharded:
        return save_hf_sharded(model, out, tokenizer_dir=model_dir)  # merges LoRA tensor by tensor
    if cfg.lora.enabled:
        merge_lora(model)
    save_hf(model, out, tokenizer_dir=model_dir)
    return out


# ------------------------------------------------------------------------------------ training


class _Batches:
    """Groups the loader's micro-batches into optimiser steps; remembers when the data ended."""

    def __init__(self, loader: DataLoader, per_step: int, device: torch.device):
        self.loader, self.per_step, self.device = loader, per_step, device
        self.exhausted = False

    def next_step(self) -> list:
        batches = []
        for batch in self.loader:
            batches.append(batch.to(self.device))
            if len(batches) == self.per_step:
                return batches
        self.exhausted = True
        return batches


def run_sft(cfg: SFTConfig, env: DistEnv | None = None, attempt: int = 0) -> SFTResult:
    """Train as configured on this rank; resumes from the newest checkpoint when asked.

    Without `env` (a plain in-process call) a world of one is formed for the run and torn down
    after it; a launcher passes the `env` of the group it owns.
    """
    if env is None:
        owns_group = not (dist.is_available() and dist.is_initialized())
        env = init_distributed()
        try:
            return run_sft(cfg, env, attempt)
        finally:
            if owns_group:
                destroy_distributed()
    device = env.device
    torch.manual_seed(cfg.train.seed + env.rank)
    run_dir = Path(cfg.run_dir)
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_resolved(cfg, run_dir / "config.yaml")

    model_dir = resolve_model_dir(cfg.model.path)
    tokenizer = load_tokenizer(model_dir, cfg.model.trust_remote_code)
    mesh = mesh_for_run(cfg.parallel, env.world_size, device)
    dp = data_parallel(mesh)  # the ranks of one tensor-parallel group read the same rows
    model = build_model(cfg, model_dir, device, mesh)
    per_step = cfg.train.grad_accum_steps(cfg.data.max_length, dp.size)
    total_steps = cfg.train.steps
    if total_steps is None:
        total_steps = -(-count_batches(cfg, tokenizer, dp) // per_step)
    optimizer = build_optimizer(model, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train, total_steps)
    loader = build_loader(cfg.data, tokenizer, batch_size=cfg.train.micro_batch_size, rank=dp.rank,
                          world_size=dp.size, seed=cfg.train.seed)
    counters: dict[str, Any] = {"step": 0, "tokens": 0, "trained_tokens": 0, "restarts": attempt}
    app_state = AppState(model, optimizer, scheduler, loader, counters)

    resume_from = find_resume_checkpoint(run_dir, cfg.checkpoint.resume)
    if resume_from is not None:
        load_checkpoint(resume_from, app_state)
        counters["restarts"] = attempt
    start_step = int(counters["step"])

    loss_fn = functools.partial(causal_lm_loss)
    shape = TransformerShape.from_model_args(model.args)
    adapters = [LoraAdapter(m.in_features, m.out_features, m.rank) for m in lora_modules(model).values()]
    train_head = (not cfg.lora.enabled) or model.head_weight.requires_grad
    peak = peak_for_precision(cfg.train.precision, device.type)

    evaluator = _Evaluator(cfg, tokenizer, env, dp, sharded=mesh is not None) if cfg.eval.enabled else None
    result = SFTResult(run_dir=str(run_dir), steps=start_step, status="finished")
    hparams = {"config_hash": config_hash(cfg), "total_steps": total_steps}
    stop = install_stop_handler()
    tracker = Tracker(run_dir, cfg.tracking, total_steps=total_steps, start_step=start_step,
                      run_name=cfg.name, hparams=hparams, rank=env.rank)

    def evaluate(at_step: int) -> None:
        result.eval = evaluator.run(model, at_step)
        tracker.log(at_step, {f"eval/{k}": v for k, v in result.eval.items()})

    try:
        if evaluator is not None and cfg.eval.at_start and start_step == 0:
            evaluate(0)
        batches = _Batches(loader, per_step, device)
        step = start_step
        while step < total_steps:
            started = time.perf_counter()
            micro = batches.next_step()
            if not micro:
                result.status = "data_exhausted"
                break
            stats = train_step(model, optimizer, micro, loss_fn, grad_clip=cfg.train.grad_clip,
                               precision=cfg.train.precision, device=device, dp_group=dp.group)
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            elapsed = time.perf_counter() - started
            step += 1
            counters["step"] = step
            counters["tokens"] += stats.num_tokens
            counters["trained_tokens"] += stats.num_trained_tokens
            result.losses.append(stats.loss)
            result.steps = step

            if step % cfg.train.log_every == 0 or step == total_steps:
                lengths = [n for mb in micro for n in document_lengths(mb)]
                local_trained = sum(mb.num_trained_tokens for mb in micro)
                # This rank's share: its data-parallel batch, split over the tensor-parallel ranks.
                flops = training_flops(shape, lengths, head_tokens=local_trained,
                                       lora=adapters or None, train_head=train_head).total / cfg.parallel.tp
                capacity = sum(mb.input_ids.numel() for mb in micro)
                data = loader.counters
                metrics = {
                    "loss": stats.loss,
                    "grad_norm": stats.grad_norm,
                    "lr": lr,
                    "tokens_per_s": stats.num_tokens / elapsed,
                    "trained_tokens_per_s": stats.num_trained_tokens / elapsed,
                    "mfu": mfu(flops, elapsed, peak),
                    "step_time_s": elapsed,
                    "peak_memory_gb": _peak_memory_bytes(device) / 2**30,
                    "packing_efficiency": sum(mb.num_tokens for mb in micro) / capacity,
                    "tokens": counters["tokens"],
                    "trained_tokens": counters["trained_tokens"],
                    "skipped_steps": int(stats.skipped),
                    "restarts": counters["restarts"],
                    "data/dropped": sum(data.dropped.values()),
                    "data/truncated": data.truncated,
                    "data/skipped_errors": data.skipped_errors,
                    "epoch": loader.epoch,
                }
                tracker.log(step, metrics)

            if evaluator is not None and cfg.eval.every_steps and step % cfg.eval.every_steps == 0:
                evaluate(step)
            if cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0 and step < total_steps:
                save_checkpoint(run_dir, step, app_state, _meta(cfg, counters), keep_last=cfg.checkpoint.keep_last)
            if stop.should_stop(device):
                result.status = "stopped"
                save_checkpoint(run_dir, step, app_state, _meta(cfg, counters), keep_last=cfg.checkpoint.keep_last)
                return result
            if batches.exhausted:
                result.status = "data_exhausted" if step < total_steps else "finished"
                break

        if cfg.checkpoint.save_at_end and result.steps > start_step:
            save_checkpoint(run_dir, result.steps, app_state, _meta(cfg, counters), keep_last=cfg.checkpoint.keep_last)
        if evaluator is not None and not (cfg.eval.every_steps and result.steps % cfg.eval.every_steps == 0 and result.steps > start_step):
            evaluate(result.steps)
        if env.is_main or mesh is not None:  # a sharded model is gathered by every rank
            export_dir = export_model(cfg, model, model_dir, run_dir / "export")
            result.export_dir = str(export_dir) if env.is_main else None
    finally:
        tracker.close()
        loader.close()
        stop.restore()
    return result


def _meta(cfg: SFTConfig, counters: dict[str, Any]) -> dict[str, Any]:
    return {"config_hash": config_hash(cfg), "tokens": counters["tokens"],
            "trained_tokens": counters["trained_tokens"]}


class _Evaluator:
    """Held-out loss (and a generation metric when a scorer is configured)."""

    def __init__(self, cfg: SFTConfig, tokenizer, env: DistEnv, dp: DataParallel, sharded: bool = False):
        self.cfg, self.tokenizer, self.env, self.dp = cfg, tokenizer, env, dp
        if sharded and cfg.eval.scorer and cfg.parallel.tp > 1:
            raise ValueError("eval.scorer generates text, which does not run under parallel.tp > 1 yet; "
                             "drop eval.scorer or set parallel.tp: 1")
        self.batches = [
            b.to(env.device)
            for b in held_out_batches(cfg.data, cfg.eval.sources, tokenizer, batch_size=cfg.train.micro_batch_size,
                                      rank=dp.rank, world_size=dp.size, max_samples=cfg.eval.max_samples)
        ]
        # A sharded model generates on every rank (its forward is collective), the same prompts.
        self.prompts = (
            held_out_prompts(cfg.eval.sources, cfg.eval.max_samples)
            if cfg.eval.scorer and (env.is_main or sharded) else []
        )

    def run(self, model: nn.Module, step: int) -> dict[str, float]:
        """Metrics at `step`; the main rank writes the scored answers to `<run>/eval/step_<N>.jsonl`."""
        out = {"loss": eval_loss(model, self.batches, causal_lm_loss, precision=self.cfg.train.precision,
                                 device=self.env.device, dp_group=self.dp.group)}
        if self.prompts:
            with torch.autocast(self.env.device.type, dtype=torch.bfloat16,
                                enabled=self.cfg.train.precision == "bf16_autocast"):
                samples = self.cfg.run_dir / "eval" / f"step_{step}.jsonl" if self.env.is_main else None
                out.update(generation_scores(model, self.tokenizer, self.prompts, self.cfg.eval.scorer,
                                             max_new_tokens=self.cfg.eval.max_new_tokens,
                                             repetition_penalty=self.cfg.eval.repetition_penalty,
                                             samples_path=samples))
        return out
