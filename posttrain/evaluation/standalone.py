"""`posttrain eval`: one model's answers to held-out prompts, scored, written and summarised.

    <output_dir>/<name>/samples.jsonl   prompt, response, reference, the scorer's metrics,
                                        response_tokens, finish_reason per prompt
    <output_dir>/<name>/summary.json    the mean of every metric, response lengths, truncated share

The same code scores the held-out generations of every recipe (`evaluation/generation.py`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from posttrain.config.evaluate import EvaluateConfig
from posttrain.config.loading import write_text_atomic
from posttrain.evaluation.generation import held_out_prompts, score_means, scored_generations, write_jsonl
from posttrain.models.hf import load_hf
from posttrain.train.roles import load_tokenizer, resolve_model_dir

DTYPES = {"auto": torch.float32, "float32": torch.float32, "bfloat16": torch.bfloat16}


def summarise(samples: list[dict], *, model: str, scorer: str, seconds: float) -> dict:
    means = score_means(samples)
    tokens = [s["response_tokens"] for s in samples]
    summary = {"model": model, "scorer": scorer, "samples": len(samples),
               **{f"score/{k}": v for k, v in means.items() if k != "response_tokens"},
               "response_tokens_mean": means.get("response_tokens", 0.0),
               "response_tokens_max": max(tokens, default=0),
               "truncated_share": (sum(s["finish_reason"] == "length" for s in samples) / len(samples)
                                   if samples else 0.0),
               "seconds": seconds}
    return summary


def run_eval(cfg: EvaluateConfig) -> dict:
    """Generate, score, write `samples.jsonl` and `summary.json`; returns the summary."""
    started = time.perf_counter()
    model_dir = resolve_model_dir(cfg.model.path)
    tokenizer = load_tokenizer(model_dir, cfg.model.trust_remote_code)
    model = load_hf(model_dir, dtype=DTYPES[cfg.model.dtype])
    prompts = held_out_prompts(cfg.sources, cfg.max_samples)
    samples = scored_generations(model, tokenizer, prompts, cfg.scorer, max_new_tokens=cfg.max_new_tokens,
                                 repetition_penalty=cfg.repetition_penalty, temperature=cfg.temperature,
                                 seed=cfg.seed, batch_size=cfg.batch_size)
    run_dir = Path(cfg.run_dir)
    write_jsonl(run_dir / "samples.jsonl", samples)
    summary = summarise(samples, model=str(model_dir), scorer=cfg.scorer, seconds=time.perf_counter() - started)
    write_text_atomic(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def summary_table(rows: dict[str, dict], title: str, first: str = ""):
    """A rich table: one row per name (column `first`), one column per summary key any row has."""
    from rich.table import Table

    keys = [k for k in dict.fromkeys(k for r in rows.values() for k in r) if k not in ("model", "scorer")]
    table = Table(title=title)
    table.add_column(first)
    for key in keys:
        table.add_column(key, justify="right")
    for name, row in rows.items():
        table.add_row(name, *(_cell(row.get(key)) for key in keys))
    return table


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)
