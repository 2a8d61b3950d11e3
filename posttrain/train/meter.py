"""Per-step metrics every recipe logs: loss, throughput, MFU, memory, packing and data counters,
plus the objective's own metrics (global means from `StepStats.metrics`)."""

from __future__ import annotations

import resource
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from posttrain.data.batch import PackedBatch
from posttrain.models.lora import lora_modules
from posttrain.train.flops import LoraAdapter, TransformerShape, mfu, peak_for_precision, training_flops
from posttrain.train.objectives import document_lengths
from posttrain.train.step import StepStats


def compile_seconds() -> float:
    """Seconds `torch.compile` has spent compiling in this process so far (Dynamo's own clock,
    backend compilation included); 0.0 where this torch does not keep that clock."""
    try:
        from torch._dynamo.utils import compilation_time_metrics
    except ImportError:
        return 0.0
    return float(sum(compilation_time_metrics.get("_compile.compile_inner", ())))


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class StepMeter:
    """Turns one step's stats into the logged metrics; FLOPs are counted from the architecture
    and the real document lengths of this rank's micro-batches (`train/flops.py`)."""

    def __init__(self, model: nn.Module, *, lora: bool, precision: str, device: torch.device, tp: int,
                 frozen_forwards: int = 0, frozen_models: Sequence[nn.Module] = (), unit: str = "tokens"):
        """`frozen_forwards`: no-grad forward passes of a same-shaped frozen model per micro-batch
        (a live reference), and `frozen_models` one forward each of other shapes (a live teacher),
        counted in MFU; `unit`: the objective's normaliser, logged per second (`pairs_per_s`,
        `sequences_per_s`) unless it is tokens."""
        self.shape = TransformerShape.from_model_args(model.args)
        self.frozen_forwards, self.unit = frozen_forwards, unit
        self.frozen_shapes = [TransformerShape.from_model_args(m.args) for m in frozen_models]
        self.adapters = [LoraAdapter(m.in_features, m.out_features, m.rank) for m in lora_modules(model).values()]
        self.train_head = (not lora) or model.head_weight.requires_grad
        self.peak = peak_for_precision(precision, device.type)
        self.device, self.tp = device, tp

    def flops(self, micro: Sequence[PackedBatch]) -> float:
        """This rank's share: its data-parallel batch, split over the tensor-parallel ranks."""
        lengths = [n for mb in micro for n in document_lengths(mb)]
        local_trained = sum(mb.num_trained_tokens for mb in micro)
        count = training_flops(self.shape, lengths, head_tokens=local_trained, lora=self.adapters or None,
                               train_head=self.train_head)
        total = count.total
        if self.frozen_forwards:  # the frozen model's forward: no adapters, head on scored tokens
            total += self.frozen_forwards * training_flops(self.shape, lengths, head_tokens=local_trained).forward
        for shape in self.frozen_shapes:
            total += training_flops(shape, lengths, head_tokens=local_trained).forward
        return total / self.tp

    def metrics(
        self, stats: StepStats, micro: Sequence[PackedBatch], elapsed: float, lr: float,
        counters: dict[str, Any], loader: Any, compile_s: float = 0.0,
    ) -> dict[str, Any]:
        """`elapsed`: the step's wall time; `compile_s` of it went to `torch.compile` (logged apart,
        and left out of the throughput and MFU, so a compiling step does not look slow)."""
        capacity = sum(mb.input_ids.numel() for mb in micro)
        data = loader.counters
        running = max(elapsed - compile_s, 1e-9)
        out = {
            "loss": stats.loss,
            "grad_norm": stats.grad_norm,
            "lr": lr,
            "tokens_per_s": stats.num_tokens / running,
            "trained_tokens_per_s": stats.num_trained_tokens / running,
            "mfu": mfu(self.flops(micro), running, self.peak),
            "step_time_s": elapsed,
            "compile_s": compile_s,
            "peak_memory_gb": peak_memory_bytes(self.device) / 2**30,
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
        if self.unit != "tokens":
            out[f"{self.unit}_per_s"] = stats.num_units / running
        out.update(stats.metrics)
        if hasattr(loader, "step_metrics"):  # a StepLoader's own (RL: the rollout's)
            out.update(loader.step_metrics())
        return out
