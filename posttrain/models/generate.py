"""Batched sampling with a KV cache: token ids and two kinds of log-probs per generated token.

Prompts are left-padded into one batch (`prefill="left"`), or run as one packed row without any
padding and scattered into the left-padded cache layout (`prefill="packed"`, less work when prompt
lengths differ); the prefill writes every prompt's keys/values into the cache once, the cache rows
are then copied for the `n` samples of each prompt, and each step feeds one token per unfinished
sample (finished samples leave the batch and the cache, so they cost nothing afterwards). Padding
is excluded by the attention metadata (`padded_attention` over the cache slots), and positions
count real tokens only, so a row's tokens are the same as if it were generated alone (up to
floating-point noise).

Token choice, the two log-prob kinds and per-sample seeds are described in
`posttrain.models.sampling`: `logprobs` are under the distribution actually sampled from (after
penalty, temperature, top-k, top-p; 0.0 for greedy), `raw_logprobs` under the model's plain
`log_softmax` (what a trainer recomputes), and a sample's randomness depends only on
`(seed, prompt_index, sample_index)`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from posttrain.models.common.attention import packed_attention, padded_attention
from posttrain.models.common.decoder import Decoder
from posttrain.models.common.kv_cache import KVCache
from posttrain.models.sampling import SamplingParams, sample, sample_generators

Prompt = str | Sequence[int] | Sequence[Mapping[str, str]]
# Renders a message list to prompt ids ending with the generation prompt; the training one is
# `lambda m: ChatRenderer(tokenizer).render_prompt(PromptExample(m)).input_ids` (posttrain.data).
RenderPrompt = Callable[[list[dict]], list[int]]


@dataclass
class GenerationOutput:
    """Per sample, prompt-major (the `n` samples of prompt 0, then those of prompt 1, ...): the
    prompt ids, the generated ids (the stopping token included), their log-probs under the
    sampled distribution (`logprobs`) and under the raw model (`raw_logprobs`), why generation
    ended ("stop" or "length"), the decoded text (special tokens and a matched stop string
    removed), and the sample's `(prompt_index, sample_index)`."""

    prompt_ids: list[list[int]]
    token_ids: list[list[int]]
    logprobs: list[list[float]]
    raw_logprobs: list[list[float]]
    finish_reasons: list[str]
    texts: list[str]
    prompt_index: list[int]
    sample_index: list[int]


def tokenize_prompts(
    tokenizer, prompts: Sequence[Prompt], render: RenderPrompt | None = None
) -> list[list[int]]:
    """Strings through the tokenizer, message lists through `render`, token-id lists as they are.

    `models` does not import the data layer, so the training renderer (`ChatRenderer`, which
    also applies the special-token rules) comes in as `render`: there is one renderer, so a
    message-list prompt without it is an error rather than a second path through the template.
    """
    out = []
    for prompt in prompts:
        if isinstance(prompt, str):
            out.append(list(tokenizer(prompt)["input_ids"]))
        elif len(prompt) and isinstance(prompt[0], Mapping):
            if render is None:
                raise ValueError(
                    "message-list prompts are rendered by the training renderer: pass "
                    "render=lambda m: ChatRenderer(tokenizer).render_prompt(PromptExample(m)).input_ids"
                )
            out.append(list(render([dict(m) for m in prompt])))
        else:
            out.append([int(t) for t in prompt])
        if not out[-1]:
            raise ValueError(f"prompt {len(out) - 1} is empty")
    return out


@lru_cache(maxsize=None)
def _generation_config_eos(path: Path) -> tuple[int, ...]:
    """The EOS ids of a `generation_config.json` (read once per path and process)."""
    if not path.is_file():
        return ()
    return tuple(_ids(json.loads(path.read_text()).get("eos_token_id")))


def _ids(value) -> list[int]:
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int)]
    return []


def default_eos_ids(model: Decoder, tokenizer) -> frozenset[int]:
    """EOS ids of the tokenizer, the model's config.json and its generation_config.json."""
    source = model.hf_source
    if source is None:
        return frozenset(_ids(getattr(tokenizer, "eos_token_id", None)))
    return checkpoint_eos_ids(source.directory, tokenizer, source.config)


def checkpoint_eos_ids(directory: Path, tokenizer, config: dict | None = None) -> frozenset[int]:
    """EOS ids of the tokenizer, `config` (default: the directory's config.json) and the
    directory's generation_config.json: what every engine stops on."""
    if config is None:
        config = json.loads((Path(directory) / "config.json").read_text())
    ids = set(_ids(getattr(tokenizer, "eos_token_id", None)))
    ids.update(_ids(config.get("eos_token_id")))
    ids.update(_generation_config_eos(Path(directory) / "generation_config.json"))
    return frozenset(ids)


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
        return trim_at_stop(text, self.strings)


def trim_at_stop(text: str, strings: list[str]) -> str:
    """`text` cut before the first stop string it contains (unchanged if none)."""
    cut = min((text.find(s) for s in strings if s in text), default=-1)
    return text if cut < 0 else text[:cut]


@dataclass
class _Batch:
    """The tensors of the rows still running: cache, key mask, prompt lengths, last logits and
    (with a repetition penalty) the tokens each row holds."""

    cache: KVCache
    key_mask: torch.Tensor  # [rows, slots] int32
    lengths: torch.Tensor  # [rows]
    logits: torch.Tensor  # [rows, V]
    seen: torch.Tensor | None  # [rows, V] bool

    def take(self, positions: list[int], device) -> None:
        """Keep the rows at `positions`, in order (a repeated position copies a row)."""
        index = torch.tensor(positions, device=device)
        self.cache.keep_rows(index)
        self.key_mask, self.lengths = self.key_mask[index], self.lengths[index]
        self.logits = self.logits[index]
        self.seen = self.seen[index] if self.seen is not None else None


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


def _prefill(
    model: Decoder, prompt_ids: list[list[int]], max_new_tokens: int, prefill: str, pad: int, device
) -> tuple[KVCache, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fill a cache with every prompt once: (cache, key mask [P, slots], lengths [P], logits [P, V])."""
    batch, prompt_len = len(prompt_ids), max(len(p) for p in prompt_ids)
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
    return cache, key_mask, lengths, logits


def _seen_tokens(prompt_ids: list[list[int]], vocab: int, device) -> torch.Tensor:
    seen = torch.zeros(len(prompt_ids), vocab, dtype=torch.bool, device=device)
    for i, ids in enumerate(prompt_ids):
        seen[i, ids] = True
    return seen


def _reshard_fsdp(model: Decoder) -> None:
    """Return FSDP2-sharded weights to their shards. FSDP2 keeps the root module's weights
    gathered after a forward (it expects a backward to follow), so after generation they would
    stay gathered, in the compute dtype, where the optimiser and checkpoints expect shards."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


@torch.no_grad()
def generate_from_ids(
    model: Decoder,
    tokenizer,
    prompt_ids: list[list[int]],
    params: SamplingParams,
    *,
    n: int = 1,
    seed: int = 0,
    prompt_index: Sequence[int] | None = None,
    eos_ids: Collection[int] | None = None,
    prefill: str = "left",
) -> GenerationOutput:
    """`n` samples of every prompt (token ids) under `params`, in one batch.

    Sample `s` of prompt `p` draws from a generator seeded by `(seed, prompt_index[p], s)`;
    `prompt_index` defaults to `0..P-1` (give global indices when prompts are split over calls or
    engines, so that a sample does not depend on the split). `eos_ids` defaults to
    `default_eos_ids(model, tokenizer)` (pass it to skip the look-up); integer entries of
    `params.stop` are added to it.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1; got {n}")
    if prefill not in ("left", "packed"):
        raise ValueError(f"prefill must be 'left' or 'packed'; got {prefill!r}")
    if not prompt_ids or any(not p for p in prompt_ids):
        raise ValueError("every prompt needs at least one token")
    prompt_index = list(range(len(prompt_ids))) if prompt_index is None else list(prompt_index)
    if len(prompt_index) != len(prompt_ids):
        raise ValueError(f"prompt_index has {len(prompt_index)} entries for {len(prompt_ids)} prompts")
    eos = set(default_eos_ids(model, tokenizer) if eos_ids is None else eos_ids)
    eos.update(s for s in params.stop if isinstance(s, int))
    stop_strings = _StopStrings(tokenizer, [s for s in params.stop if isinstance(s, str)])
    device = model.tok_embeddings.weight.device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    cache, key_mask, lengths, logits = _prefill(
        model, prompt_ids, params.max_new_tokens, prefill, pad, device
    )
    seen = None  # tokens each row holds so far, only kept for a repetition penalty
    if params.repetition_penalty != 1.0:
        seen = _seen_tokens(prompt_ids, logits.shape[-1], device)
    samples = [(p, s) for p in range(len(prompt_ids)) for s in range(n)]
    generators = sample_generators(seed, [(prompt_index[p], s) for p, s in samples])
    state = _Batch(cache, key_mask, lengths, logits, seen)
    if n > 1:  # the prefill ran once per prompt; each sample gets a copy of its prompt's row
        state.take([p for p, _ in samples], device)
    tokens, logprobs, raw, reasons = _decode(model, state, generators, params, eos, stop_strings)
    _reshard_fsdp(model)

    texts = [tokenizer.decode(t, skip_special_tokens=True) for t in tokens]
    if stop_strings.strings:
        texts = [stop_strings.trim(t) for t in texts]
    return GenerationOutput(
        prompt_ids=[list(prompt_ids[p]) for p, _ in samples],
        token_ids=tokens,
        logprobs=logprobs,
        raw_logprobs=raw,
        finish_reasons=reasons,
        texts=texts,
        prompt_index=[prompt_index[p] for p, _ in samples],
        sample_index=[s for _, s in samples],
    )


def _decode(
    model: Decoder,
    state: _Batch,
    generators: list[torch.Generator],
    params: SamplingParams,
    eos: set[int],
    stop_strings: _StopStrings,
) -> tuple[list[list[int]], list[list[float]], list[list[float]], list[str]]:
    """The decoding loop: sample, record, drop finished rows, feed the rest one token each.
    Row `i` of `state` is sample `i` and draws from `generators[i]`."""
    count, device = len(generators), state.logits.device
    tokens: list[list[int]] = [[] for _ in range(count)]
    logprobs: list[list[float]] = [[] for _ in range(count)]
    raw: list[list[float]] = [[] for _ in range(count)]
    reasons = ["length"] * count
    rows = list(range(count))  # the sample each running row is
    prompt_len = state.cache.length
    for step in range(params.max_new_tokens):
        chosen = sample(state.logits, params, generators, state.seen)
        if state.seen is not None:
            state.seen[torch.arange(len(rows), device=device), chosen.tokens] = True
        ids, lps, raws = chosen.tokens.tolist(), chosen.logprobs.tolist(), chosen.raw_logprobs.tolist()
        keep = []
        for position, i in enumerate(rows):
            tokens[i].append(ids[position])
            logprobs[i].append(lps[position])
            raw[i].append(raws[position])
            if ids[position] in eos or stop_strings.matched(tokens[i]):
                reasons[i] = "stop"
            else:
                keep.append(position)
        if not keep or step == params.max_new_tokens - 1:
            break
        next_tokens = chosen.tokens
        if len(keep) < len(rows):  # drop finished rows so later steps don't compute them
            state.take(keep, device)
            next_tokens = next_tokens[torch.tensor(keep, device=device)]
            rows, generators = [rows[p] for p in keep], [generators[p] for p in keep]
        slot = prompt_len + step
        state.key_mask[:, slot] = 1
        attn = padded_attention(state.key_mask[:, : slot + 1], query_len=1)
        hidden = model(next_tokens[:, None], (state.lengths + step)[:, None], attn, state.cache)
        state.logits = model.logits(hidden[:, -1])
    return tokens, logprobs, raw, reasons


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
    *,
    n: int = 1,
    prompt_index: Sequence[int] | None = None,
    eos_ids: Collection[int] | None = None,
    render: RenderPrompt | None = None,
) -> GenerationOutput:
    """Sample up to `max_new_tokens` for every prompt (`n` samples each) in one batch.

    Prompts are strings, message lists (rendered with the generation prompt by `render`, or by
    the tokenizer's chat template; see `tokenize_prompts`) or token-id lists. `temperature=0` is
    greedy; `repetition_penalty` > 1 discourages every token already in the row
    (`penalise_repeats`), greedy decoding included. A row stops at an EOS token (`eos_ids`, by
    default those of the tokenizer, config and generation config), at any integer token id in
    `stop`, or when its text contains a string in `stop`. See `generate_from_ids` for `n`, `seed`
    and `prompt_index`.
    """
    params = SamplingParams(
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        repetition_penalty=repetition_penalty,
        max_new_tokens=max_new_tokens,
        stop=tuple(stop or ()),
    )
    prompt_ids = tokenize_prompts(tokenizer, prompts, render)
    return generate_from_ids(
        model, tokenizer, prompt_ids, params, n=n, seed=seed, prompt_index=prompt_index,
        eos_ids=eos_ids, prefill=prefill,
    )
