"""Batched sampling with a KV cache, returning token ids and the log-probs of sampled tokens.

Prompts are left-padded into one batch (`prefill="left"`), or run as one packed row without any
padding and scattered into the left-padded cache layout (`prefill="packed"`, less work when prompt
lengths differ); the prefill writes every prompt's keys/values into a
preallocated cache, then each step feeds one token per unfinished row (finished rows leave the
batch and the cache, so they cost nothing afterwards). Padding is excluded by the attention
metadata (`padded_attention` over the cache slots), and positions count real tokens only, so a
row's tokens are the same as if it were generated alone (up to floating-point noise).

Log-probs are those of the sampling distribution before truncation: `log_softmax(logits / T)`
(T = 1 for greedy), which is what an RL trainer recomputes from its own forward pass; top-k/top-p
only restrict which tokens can be drawn. A repetition penalty (off by default) changes the logits
themselves, so the log-probs are then those of the penalised distribution and no longer match a
plain forward pass.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from posttrain.models.common.attention import packed_attention, padded_attention
from posttrain.models.common.decoder import Decoder

Prompt = str | Sequence[int] | Sequence[Mapping[str, str]]


@dataclass
class GenerationOutput:
    """Per prompt: prompt ids, generated ids (the stopping token included), their log-probs,
    why generation ended ("stop" or "length") and the decoded text (special tokens and a matched
    stop string removed)."""

    prompt_ids: list[list[int]]
    token_ids: list[list[int]]
    logprobs: list[list[float]]
    finish_reasons: list[str]
    texts: list[str]


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no limit
    repetition_penalty: float = 1.0  # 1 means none; > 1 discourages tokens already in the row

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy); got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1]; got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = no limit); got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0 (1 = none); got {self.repetition_penalty}")


def penalise_repeats(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """The CTRL-style repetition penalty (as in transformers and vLLM): the logit of every token
    already in the row (prompt or generated; `seen` [B, V] bool) is divided by `penalty` where
    positive and multiplied by it where negative, so penalty > 1 always makes it less likely."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def sample(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, V] -> (tokens [B], log-probs [B]) under `params`."""
    logits = logits.float()
    if params.temperature == 0:
        tokens = logits.argmax(-1)
        return tokens, torch.log_softmax(logits, -1).gather(-1, tokens[:, None])[:, 0]
    scaled = logits / params.temperature
    logprobs = torch.log_softmax(scaled, -1)
    allowed = scaled
    if params.top_k > 0:
        kth = torch.topk(scaled, min(params.top_k, scaled.shape[-1]), dim=-1).values[:, -1:]
        allowed = allowed.masked_fill(scaled < kth, float("-inf"))
    if params.top_p < 1:
        sorted_logits, order = torch.sort(allowed, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, -1)
        mass_before = probs.cumsum(-1) - probs  # the most likely token always stays
        drop = torch.zeros_like(allowed, dtype=torch.bool).scatter(
            -1, order, mass_before >= params.top_p
        )
        allowed = allowed.masked_fill(drop, float("-inf"))
    tokens = torch.multinomial(torch.softmax(allowed, -1), 1, generator=generator)[:, 0]
    return tokens, logprobs.gather(-1, tokens[:, None])[:, 0]


def tokenize_prompts(tokenizer, prompts: Sequence[Prompt]) -> list[list[int]]:
    """Strings through the tokenizer, message lists through its chat template (with the
    generation prompt), token-id lists as they are."""
    out = []
    for prompt in prompts:
        if isinstance(prompt, str):
            out.append(list(tokenizer(prompt)["input_ids"]))
        elif len(prompt) and isinstance(prompt[0], Mapping):
            ids = tokenizer.apply_chat_template(
                list(prompt), add_generation_prompt=True, tokenize=True
            )
            out.append(list(ids["input_ids"] if isinstance(ids, Mapping) else ids))
        else:
            out.append([int(t) for t in prompt])
        if not out[-1]:
            raise ValueError(f"prompt {len(out) - 1} is empty")
    return out


def stop_token_ids(model: Decoder, tokenizer, stop: Sequence[str | int] | None) -> set[int]:
    """EOS ids of the tokenizer, config and generation config, plus integer entries of `stop`."""
    ids: set[int] = set()

    def add(value) -> None:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(v for v in value if isinstance(v, int))

    add(getattr(tokenizer, "eos_token_id", None))
    source = model.hf_source
    if source is not None:
        add(source.config.get("eos_token_id"))
        gen_config = source.directory / "generation_config.json"
        if gen_config.is_file():
            add(json.loads(gen_config.read_text()).get("eos_token_id"))
    for item in stop or ():
        if isinstance(item, int):
            ids.add(item)
    return ids


class _StopStrings:
    """Detects stop strings in each row's generated text (decoding only a short tail)."""

    def __init__(self, tokenizer, strings: list[str]):
        self.tokenizer = tokenizer
        self.strings = strings
        self.tail = max((len(s) for s in strings), default=0) + 8  # tokens, >= 1 char each

    def matched(self, tokens: list[int]) -> bool:
        if not self.strings:
            return False
        text = self.tokenizer.decode(tokens[-self.tail :], skip_special_tokens=False)
        return any(s in text for s in self.strings)

    def trim(self, text: str) -> str:
        cut = min((text.find(s) for s in self.strings if s in text), default=-1)
        return text if cut < 0 else text[:cut]


def _packed_prefill(
    model: Decoder, cache, prompt_ids: list[list[int]], prompt_len: int, device
) -> torch.Tensor:
    """Run all prompts as one packed row, storing keys/values right-aligned per batch row;
    returns the last-token logits [B, V]."""
    lengths = torch.tensor([len(p) for p in prompt_ids], device=device)
    flat = torch.tensor([t for p in prompt_ids for t in p], device=device)
    rows = torch.repeat_interleave(torch.arange(len(prompt_ids), device=device), lengths)
    ends = lengths.cumsum(0)
    starts = ends - lengths
    offsets = torch.arange(len(flat), device=device) - starts[rows]  # position within the prompt
    slots = prompt_len - lengths[rows] + offsets
    cu_seqlens = torch.cat([ends.new_zeros(1), ends]).to(torch.int32)
    attn = packed_attention(cu_seqlens, int(lengths.max()), 1, len(flat))
    cache.scatter_next(rows, slots, prompt_len)
    hidden = model(flat[None], offsets[None], attn, cache)
    return model.logits(hidden[0, ends - 1])


@torch.no_grad()
def generate(
    model: Decoder,
    tokenizer,
    prompts: Sequence[Prompt],
    max_new_tokens: int = 128,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    repetition_penalty: float = 1.0,
    stop: Sequence[str | int] | None = None,
    seed: int = 0,
    prefill: str = "left",
) -> GenerationOutput:
    """Sample up to `max_new_tokens` for every prompt in one batch.

    `temperature=0` is greedy; `repetition_penalty` > 1 discourages every token already in the row
    (`penalise_repeats`), greedy decoding included. A row stops at an EOS token (tokenizer, config
    or generation config), at any integer token id in `stop`, or when its text contains a string in
    `stop`.
    Sampling is deterministic for a given batch and `seed`.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1; got {max_new_tokens}")
    if prefill not in ("left", "packed"):
        raise ValueError(f"prefill must be 'left' or 'packed'; got {prefill!r}")
    params = SamplingParams(temperature, top_p, top_k, repetition_penalty)
    prompt_ids = tokenize_prompts(tokenizer, prompts)
    eos = stop_token_ids(model, tokenizer, stop)
    stop_strings = _StopStrings(tokenizer, [s for s in stop or () if isinstance(s, str)])
    device = model.tok_embeddings.weight.device
    generator = torch.Generator(device=device).manual_seed(seed)

    batch, prompt_len = len(prompt_ids), max(len(p) for p in prompt_ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((batch, prompt_len), pad, dtype=torch.long)
    key_mask = torch.zeros(batch, prompt_len + max_new_tokens, dtype=torch.int32)
    for i, ids in enumerate(prompt_ids):
        input_ids[i, prompt_len - len(ids) :] = torch.tensor(ids)
        key_mask[i, prompt_len - len(ids) : prompt_len] = 1
    input_ids, key_mask = input_ids.to(device), key_mask.to(device)
    lengths = torch.tensor([len(p) for p in prompt_ids], device=device)

    cache = model.new_cache(batch, prompt_len + max_new_tokens)
    if prefill == "packed":
        logits = _packed_prefill(model, cache, prompt_ids, prompt_len, device)
    else:
        positions = (key_mask[:, :prompt_len].cumsum(1) - 1).clamp(min=0)
        hidden = model(input_ids, positions, padded_attention(key_mask[:, :prompt_len]), cache)
        logits = model.logits(hidden[:, -1])

    seen = None  # [rows, V]: tokens each row holds so far, only kept for a repetition penalty
    if params.repetition_penalty != 1.0:
        seen = torch.zeros(batch, logits.shape[-1], dtype=torch.bool, device=device)
        for i, ids in enumerate(prompt_ids):
            seen[i, ids] = True

    tokens: list[list[int]] = [[] for _ in range(batch)]
    logprobs: list[list[float]] = [[] for _ in range(batch)]
    reasons = ["length"] * batch
    rows = list(range(batch))  # the prompt index of each row still in the batch
    for step in range(max_new_tokens):
        if seen is not None:
            logits = penalise_repeats(logits.float(), seen, params.repetition_penalty)
        next_tokens, next_logprobs = sample(logits, params, generator)
        if seen is not None:
            seen[torch.arange(len(rows), device=device), next_tokens] = True
        chosen, chosen_lp = next_tokens.tolist(), next_logprobs.tolist()
        keep = []
        for position, i in enumerate(rows):
            tokens[i].append(chosen[position])
            logprobs[i].append(chosen_lp[position])
            if chosen[position] in eos or stop_strings.matched(tokens[i]):
                reasons[i] = "stop"
            else:
                keep.append(position)
        if not keep or step == max_new_tokens - 1:
            break
        if len(keep) < len(rows):  # drop finished rows so later steps don't compute them
            index = torch.tensor(keep, device=device)
            cache.keep_rows(index)
            key_mask, lengths, next_tokens = key_mask[index], lengths[index], next_tokens[index]
            seen = seen[index] if seen is not None else None
            rows = [rows[p] for p in keep]
        slot = prompt_len + step
        key_mask[:, slot] = 1
        attn = padded_attention(key_mask[:, : slot + 1], query_len=1)
        hidden = model(next_tokens[:, None], (lengths + step)[:, None], attn, cache)
        logits = model.logits(hidden[:, -1])

    texts = [tokenizer.decode(t, skip_special_tokens=True) for t in tokens]
    if stop_strings.strings:
        texts = [stop_strings.trim(t) for t in texts]
    return GenerationOutput(prompt_ids, tokens, logprobs, reasons, texts)
