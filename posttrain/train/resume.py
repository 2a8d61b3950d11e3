"""Resuming a run: pick an intact checkpoint, check the config against it, load it.

Order, on every rank alike (the verification is collective):

1. `choose_checkpoint`: the candidates `checkpoint.resume` allows, preferred first; each is
   verified against its checksum manifest. A corrupt one is named with what is wrong; with
   `checkpoint.on_corrupt: fallback` (default) the next older one is tried with a warning, with
   `raise` the run stops and the message offers the newest intact checkpoint. This runs before
   the model loads.
2. `config_changes`: the run's config against the one the checkpoint was saved with. Keys that
   define what is trained and in which order (model, data, batch shape, seed, LoRA, optimiser
   settings other than the rate) cannot change: a `ConfigError` lists each with both values.
   Keys in the recipe config's `RESUME_MUTABLE` (steps, lr, schedule, warmup, evaluation,
   logging, checkpointing, launcher and parallel layout, which DCP reshards) are applied and
   logged as a diff. The schedule is a function of the step and the current `train` settings
   (`WarmupDecayLR.load_state_dict` keeps only the step), so it continues as if the run had been
   configured this way from the start.
3. `load_resume_point`: load it; a checkpoint that still cannot be read (one written without a
   manifest) falls back like a corrupt one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from posttrain.config import ConfigError, RecipeConfig, TrainConfig, config_hash
from posttrain.train.checkpoint import AppState, load_checkpoint, resume_candidates
from posttrain.train.checkpoint_io import CheckpointError, read_meta, verify_checkpoint

logger = logging.getLogger("posttrain.train")


@dataclass
class ResumePoint:
    """The chosen checkpoint, its `meta.json`, and the intact-or-unverified older candidates."""

    checkpoint: Path
    meta: dict[str, Any]
    fallbacks: list[Path] = field(default_factory=list)


def choose_checkpoint(cfg: RecipeConfig, device: torch.device | str = "cpu", world_size: int = 1
                      ) -> ResumePoint | None:
    """The newest intact checkpoint `checkpoint.resume` allows (None: start fresh)."""
    candidates = resume_candidates(cfg.run_dir, cfg.checkpoint.resume)
    corrupt: list[str] = []
    for i, candidate in enumerate(candidates):
        problems = verify_checkpoint(candidate, device)
        if not problems:
            meta = read_meta(candidate)
            check_config(cfg, meta, candidate, world_size)
            return ResumePoint(candidate, meta, candidates[i + 1:])
        message = f"checkpoint {candidate} is corrupt: {'; '.join(problems)}"
        corrupt.append(message)
        if cfg.checkpoint.on_corrupt == "raise":
            raise CheckpointError(message + _offer(candidates[i + 1:], device))
        logger.warning("%s; falling back to the previous complete checkpoint", message)
    if corrupt:
        raise CheckpointError(
            "no intact checkpoint to resume from:\n  " + "\n  ".join(corrupt)
            + "\nmove them away, or set checkpoint.resume: never to start over"
        )
    return None


def _offer(rest: list[Path], device: torch.device | str) -> str:
    for candidate in rest:
        if not verify_checkpoint(candidate, device):
            return (f"; the newest intact checkpoint is {candidate} (resume from it with "
                    f"checkpoint.resume={candidate}, or set checkpoint.on_corrupt: fallback)")
    return "; no older intact checkpoint exists (checkpoint.resume: never starts over)"


def load_resume_point(point: ResumePoint, cfg: RecipeConfig, app_state: AppState,
                      device: torch.device | str = "cpu", world_size: int = 1) -> ResumePoint:
    """Load `point` into `app_state`; falls back to older intact checkpoints when it cannot be
    read (and `checkpoint.on_corrupt` allows). Returns the point that was loaded."""
    while True:
        try:
            load_checkpoint(point.checkpoint, app_state)
            return point
        except CheckpointError as err:
            older = [p for p in point.fallbacks if not verify_checkpoint(p, device)]
            if cfg.checkpoint.on_corrupt == "raise" or not older:
                hint = f"; the newest intact older checkpoint is {older[0]}" if older else ""
                raise CheckpointError(f"{err}{hint}") from None
            logger.warning("%s; falling back to %s", err, older[0])
            meta = read_meta(older[0])
            check_config(cfg, meta, older[0], world_size)
            point = ResumePoint(older[0], meta, older[1:])


# ----------------------------------------------------------------------------- config drift


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """`{"train": {"lr": 1}}` -> `{"train.lr": 1}`; lists are compared whole."""
    if not isinstance(data, dict):
        return {prefix: data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def config_changes(saved: dict[str, Any], current: dict[str, Any], mutable: tuple[str, ...]
                   ) -> tuple[dict[str, tuple[Any, Any]], dict[str, tuple[Any, Any]]]:
    """(allowed, refused) changes: `{dotted key: (saved value, current value)}`."""
    old, new = flatten(saved), flatten(current)
    changed = {k: (old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)}
    changed.pop("checkpoint.resume", None)

    def allowed(key: str) -> bool:
        return any(key == m or key.startswith(m + ".") for m in mutable)

    return ({k: v for k, v in changed.items() if allowed(k)},
            {k: v for k, v in changed.items() if not allowed(k)})


BATCH_KEYS = ("train.micro_batch_size", "train.grad_accum", "train.tokens_per_step")


def global_rows_per_step(config: dict[str, Any], world_size: int) -> int:
    """Packed rows one optimiser step takes over all ranks (micro-batch x accumulation x dp)."""
    train = TrainConfig.model_validate(config["train"])
    dp = max(1, world_size // config.get("parallel", {}).get("tp", 1))
    return train.micro_batch_size * train.grad_accum_steps(config["data"]["max_length"], dp) * dp


def check_config(cfg: RecipeConfig, meta: dict[str, Any], checkpoint: Path, world_size: int = 1
                 ) -> dict[str, tuple[Any, Any]]:
    """Refuse changes that cannot apply to a resumed run; log (and return) those that do.

    The per-rank batch keys may change with the world size as long as the global batch (rows
    per optimiser step) stays the same, which is how a run moves to another number of ranks.
    """
    saved = meta.get("config")
    current = cfg.model_dump(mode="json")
    if saved is None:  # written before configs were stored: only the hash can be compared
        if meta.get("config_hash") not in (None, config_hash(cfg)):
            logger.warning("the config differs from the one %s was saved with (which keys cannot "
                           "be told: it predates stored configs)", checkpoint)
        return {}
    allowed, refused = config_changes(saved, current, type(cfg).RESUME_MUTABLE)
    if any(k in refused for k in BATCH_KEYS) and not any(k.startswith("data.") for k in refused):
        before = global_rows_per_step(saved, int(meta.get("world_size", world_size)))
        if before == global_rows_per_step(current, world_size):
            allowed.update({k: refused.pop(k) for k in BATCH_KEYS if k in refused})
    if refused:
        lines = "\n".join(f"  {k}: {_show(a)} at {checkpoint.name}, now {_show(b)}" for k, (a, b) in refused.items())
        raise ConfigError(
            f"the config changed in keys a resumed run cannot change ({checkpoint}):\n{lines}\n"
            "restore them, or start a new run (another name, or checkpoint.resume: never); the "
            "per-rank batch may change only with the world size, keeping the rows per step"
        )
    if allowed:
        diff = ", ".join(f"{k} {_show(a)} -> {_show(b)}" for k, (a, b) in allowed.items())
        logger.info("config changed since %s, applied: %s", checkpoint.name, diff)
    return allowed


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
