"""Held-out evaluation: loss on packed held-out batches, and a generation metric from a scorer."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch.nn as nn

from posttrain.config.data import DataConfig, SourceConfig
from posttrain.data.batch import PackedBatch
from posttrain.data.loader import build_loader
from posttrain.data.rows import Conversation, parse_row
from posttrain.data.sources import open_source
from posttrain.models.generate import generate
from posttrain.rl.rewards import get_scorer


@dataclass
class HeldOutPrompt:
    messages: list[dict]  # the conversation up to (without) the last assistant turn
    reference: str  # the last assistant turn's content


def held_out_batches(
    data: DataConfig,
    sources: list[SourceConfig],
    tokenizer,
    *,
    batch_size: int,
    rank: int,
    world_size: int,
    max_samples: int | None,
) -> list[PackedBatch]:
    """Every held-out sample, rendered and packed like training data, one pass, in file order."""
    cfg = data.model_copy(update={"sources": sources, "shuffle": False, "epochs": 1, "prefetch": 0})
    batches = []
    with build_loader(cfg, tokenizer, batch_size=batch_size, rank=rank, world_size=world_size) as loader:
        for batch in loader:
            batches.append(batch)
            if max_samples is not None and loader.counters.samples >= max_samples:
                break
    return batches


def held_out_prompts(sources: list[SourceConfig], max_samples: int | None) -> list[HeldOutPrompt]:
    """Prompts for generation: each held-out conversation cut before its last assistant turn."""
    prompts: list[HeldOutPrompt] = []
    for source in sources:
        reader = open_source(source)
        for raw in reader.iter_from(reader.start()):
            example = parse_row(raw.load(), source, task="sft")
            if not isinstance(example, Conversation):
                raise raw.error(None, "generation scoring needs chat rows (messages or mapped roles)")
            last = max(i for i, m in enumerate(example.messages) if m["role"] == "assistant")
            prompts.append(HeldOutPrompt(example.messages[:last], example.messages[last]["content"]))
            if max_samples is not None and len(prompts) >= max_samples:
                return prompts
    return prompts


def generation_scores(
    model: nn.Module,
    tokenizer,
    prompts: list[HeldOutPrompt],
    scorer: str,
    *,
    max_new_tokens: int,
    repetition_penalty: float = 1.0,
    batch_size: int = 16,
    samples_path: Path | None = None,
) -> dict[str, float]:
    """Greedy answers to `prompts` (with an optional repetition penalty), scored; returns the mean
    of each scorer metric.

    With `samples_path`, every prompt's last message, the answer, the reference and the scores are
    written there as JSONL, so a metric can be read next to the text behind it.
    """
    score = get_scorer(scorer)
    samples: list[dict] = []
    scores: list[dict[str, float]] = []
    was_training = model.training
    model.eval()
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        out = generate(model, tokenizer, [p.messages for p in chunk], max_new_tokens=max_new_tokens,
                       temperature=0.0, repetition_penalty=repetition_penalty)
        for prompt, text in zip(chunk, out.texts):
            scores.append(score(text, prompt.reference))
            samples.append({"prompt": prompt.messages[-1]["content"], "response": text,
                            "reference": prompt.reference, **scores[-1]})
    model.train(was_training)
    if samples_path is not None:
        samples_path.parent.mkdir(parents=True, exist_ok=True)
        samples_path.write_text("".join(json.dumps(s) + "\n" for s in samples))
    return {key: sum(s[key] for s in scores) / len(scores) for key in (scores[0] if scores else {})}
