"""Generation metrics on held-out prompts: greedy answers scored by a registered scorer."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from posttrain.config.data import SourceConfig
from posttrain.data.chat import ChatRenderer
from posttrain.data.rows import Conversation, PromptExample, parse_row
from posttrain.data.sources import open_source
from posttrain.models.generate import generate
from posttrain.rl.rewards import get_scorer


@dataclass
class HeldOutPrompt:
    messages: list[dict]  # the conversation up to (without) the last assistant turn
    reference: str  # the last assistant turn's content


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


def scored_generations(
    model: nn.Module,
    tokenizer,
    prompts: list[HeldOutPrompt],
    scorer: str,
    *,
    max_new_tokens: int,
    repetition_penalty: float = 1.0,
    temperature: float = 0.0,
    seed: int = 0,
    batch_size: int = 16,
) -> list[dict]:
    """Answers to `prompts` (greedy at temperature 0, else sampled with `seed`), one record each:
    the prompt's last message, the answer, the reference, the scorer's metrics, the answer's
    token count and why it ended ("stop" or "length")."""
    score = get_scorer(scorer)
    renderer = ChatRenderer(tokenizer)

    def render(messages: list[dict]) -> list[int]:
        return renderer.render_prompt(PromptExample(messages)).input_ids

    samples: list[dict] = []
    was_training = model.training
    model.eval()
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        out = generate(model, tokenizer, [p.messages for p in chunk], max_new_tokens=max_new_tokens, render=render,
                       temperature=temperature, repetition_penalty=repetition_penalty, seed=seed,
                       prompt_index=range(start, start + len(chunk)))
        for prompt, text, ids, finish in zip(chunk, out.texts, out.token_ids, out.finish_reasons):
            samples.append({"prompt": prompt.messages[-1]["content"], "response": text,
                            "reference": prompt.reference, **score(text, prompt.reference),
                            "response_tokens": len(ids), "finish_reason": finish})
    model.train(was_training)
    return samples


def score_means(samples: list[dict], keys: list[str] | None = None) -> dict[str, float]:
    """The mean of every numeric metric of the records (`keys`: only those)."""
    if not samples:
        return {}
    names = keys or [k for k, v in samples[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return {k: sum(float(s[k]) for s in samples) / len(samples) for k in names}


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def generation_scores(model: nn.Module, tokenizer, prompts: list[HeldOutPrompt], scorer: str, *,
                      samples_path: Path | None = None, **options) -> dict[str, float]:
    """Answers to `prompts` (`scored_generations`, greedy unless `options` say otherwise), scored;
    returns the mean of each scorer metric. With `samples_path`, every scored answer is written
    there as JSONL, so a metric can be read next to the text behind it."""
    samples = scored_generations(model, tokenizer, prompts, scorer, **options)
    if samples_path is not None:
        write_jsonl(samples_path, samples)
    metrics = [k for k in (samples[0] if samples else {}) if k not in
               ("prompt", "response", "reference", "response_tokens", "finish_reason")]
    return score_means(samples, metrics)


class GenerationEvaluator:
    """Greedy answers to held-out prompts, scored (`eval.scorer`); the main rank writes every
    scored answer to `<run>/eval/step_<N>.jsonl`. A sharded model generates on every rank (its
    forward is collective), the same prompts."""

    def __init__(self, tokenizer, prompts: list[HeldOutPrompt], scorer: str, *, max_new_tokens: int,
                 repetition_penalty: float, device: torch.device, bf16_autocast: bool,
                 samples_dir: Path | None):
        self.tokenizer, self.prompts, self.scorer = tokenizer, prompts, scorer
        self.max_new_tokens, self.repetition_penalty = max_new_tokens, repetition_penalty
        self.device, self.bf16_autocast, self.samples_dir = device, bf16_autocast, samples_dir

    def run(self, model: nn.Module, step: int) -> dict[str, float]:
        samples = self.samples_dir / f"step_{step}.jsonl" if self.samples_dir is not None else None
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16_autocast):
            return generation_scores(model, self.tokenizer, self.prompts, self.scorer,
                                     max_new_tokens=self.max_new_tokens,
                                     repetition_penalty=self.repetition_penalty, samples_path=samples)
