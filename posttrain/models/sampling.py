"""One decoding step's token choice: sampling parameters, logit processing, per-sample randomness.

The distribution a token is drawn from is built from the model's logits in a fixed order:
repetition penalty, temperature, top-k, then top-p (each truncation renormalises). Two log-probs
come back for every chosen token:

* `logprobs`: under that processed distribution, the one the token was actually drawn from (the
  behaviour policy an RL importance weight divides by). Greedy decoding (`temperature=0`) puts
  probability 1 on the arg-max, so its processed log-prob is defined as 0.0.
* `raw_logprobs`: `log_softmax` of the model's raw logits at temperature 1 over the real
  vocabulary, without penalty or truncation: what a trainer recomputes from its own forward.

Randomness is per sample: each sample has its own CPU `torch.Generator`, seeded by
`sample_seed(seed, prompt_index, sample_index)`, that draws one uniform number per step; the
token is where that number falls in the cumulative distribution (inverse-CDF sampling, in
token-id order). So a sample depends on its own seed triple and logits only, never on which
other prompts or samples share the batch, and the draws are the same on every device.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens, and when to stop.

    `stop` holds token ids (a row ends after emitting one) and strings (a row ends once its text
    contains one; the string is cut from the returned text). EOS ids are always stop tokens.
    """

    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no limit
    repetition_penalty: float = 1.0  # 1 means none; > 1 discourages tokens already in the row
    max_new_tokens: int = 128
    stop: tuple[str | int, ...] = ()

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy); got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1]; got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = no limit); got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0 (1 = none); got {self.repetition_penalty}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1; got {self.max_new_tokens}")
        object.__setattr__(self, "stop", tuple(self.stop))
        for item in self.stop:
            if not (isinstance(item, str) and item) and not (isinstance(item, int) and item >= 0):
                raise ValueError(f"stop entries must be non-empty strings or token ids; got {item!r}")


@dataclass
class Sampled:
    """One step for B rows: chosen tokens and both log-probs (see the module docstring), [B] each."""

    tokens: torch.Tensor
    logprobs: torch.Tensor
    raw_logprobs: torch.Tensor


def sample_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """The generator seed of one sample: a hash of the triple (64 bits, stable across runs)."""
    digest = hashlib.blake2b(f"{seed}/{prompt_index}/{sample_index}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "little")


def sample_generators(seed: int, samples: list[tuple[int, int]]) -> list[torch.Generator]:
    """One CPU generator per `(prompt_index, sample_index)`."""
    return [torch.Generator().manual_seed(sample_seed(seed, p, s)) for p, s in samples]


def penalise_repeats(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """The CTRL-style repetition penalty (as in transformers and vLLM): the logit of every token
    already in the row (prompt or generated; `seen` [B, V] bool) is divided by `penalty` where
    positive and multiplied by it where negative, so penalty > 1 always makes it less likely."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def truncate(scaled: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set the logits outside top-k, then outside the top-p nucleus of what is left, to -inf.

    The nucleus is the smallest set of most likely tokens whose mass reaches `top_p` (the most
    likely token always stays); ties at the k-th logit are all kept.
    """
    allowed = scaled
    if top_k > 0:
        kth = torch.topk(scaled, min(top_k, scaled.shape[-1]), dim=-1).values[:, -1:]
        allowed = allowed.masked_fill(scaled < kth, float("-inf"))
    if top_p < 1:
        sorted_logits, order = torch.sort(allowed, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, -1)
        mass_before = probs.cumsum(-1) - probs
        drop = torch.zeros_like(allowed, dtype=torch.bool).scatter(-1, order, mass_before >= top_p)
        allowed = allowed.masked_fill(drop, float("-inf"))
    return allowed


def inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """probs [B, V] (rows summing to ~1), uniforms [B] in [0, 1) -> tokens [B].

    Picks the first token whose cumulative mass exceeds `u * total`; that token always has
    probability > 0, even when rounding puts `u * total` at the total.
    """
    cdf = probs.cumsum(-1)
    total = cdf[:, -1]
    target = torch.minimum(uniforms.to(total) * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target[:, None], right=True)[:, 0]


def draw_uniforms(generators: list[torch.Generator]) -> torch.Tensor:
    """One uniform number in [0, 1) from each row's generator, [B] fp32 on CPU."""
    return torch.stack([torch.rand((), generator=g) for g in generators])


def sample(
    logits: torch.Tensor,
    params: SamplingParams,
    generators: list[torch.Generator],
    seen: torch.Tensor | None = None,
) -> Sampled:
    """logits [B, V] -> one token per row under `params`, row `i` drawing from `generators[i]`.

    `seen` [B, V] marks the tokens each row holds so far (needed for a repetition penalty).
    """
    raw = logits.float()
    processed = raw
    if params.repetition_penalty != 1.0:
        if seen is None:
            raise ValueError("a repetition penalty needs the tokens each row has seen")
        processed = penalise_repeats(raw, seen, params.repetition_penalty)
    if params.temperature == 0:
        tokens = processed.argmax(-1)
        logprobs = torch.zeros(len(tokens), device=raw.device)  # probability 1
    else:
        allowed = truncate(processed / params.temperature, params.top_k, params.top_p)
        log_dist = torch.log_softmax(allowed, -1)
        tokens = inverse_cdf(log_dist.exp(), draw_uniforms(generators))
        logprobs = log_dist.gather(-1, tokens[:, None])[:, 0]
    raw_logprobs = torch.log_softmax(raw, -1).gather(-1, tokens[:, None])[:, 0]
    return Sampled(tokens, logprobs, raw_logprobs)
