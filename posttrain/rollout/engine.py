"""The generation-engine interface RL drives: `RolloutBatch` out, HF-named weights in.

An engine samples `n` continuations of each prompt and reports, per token, the log-prob under the
distribution it sampled from (`logprobs`, what importance weights divide by) and under the raw
model (`raw_logprobs`). The trainer pushes new weights as Hugging Face-named tensors, one at a
time (`posttrain.parallel.export.iter_hf_tensors_for_sync`), and numbers them with a policy
version that every batch generated afterwards carries. `sleep()` / `wake()` free the engine's
memory while a colocated trainer runs.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from posttrain.models.generate import GenerationOutput
from posttrain.models.sampling import SamplingParams

__all__ = ["GenerationEngine", "RolloutBatch", "SamplingParams"]


@dataclass
class RolloutBatch:
    """N = num_prompts * n samples in prompt-major order (all samples of prompt 0 first).

    `tokens`, `logprobs` and `raw_logprobs` are right-padded to the longest continuation `T`:
    tokens with `pad_id`, log-probs with 0. An engine that cannot report `raw_logprobs` (vLLM off
    plain sampling) fills them with NaN. `lengths` counts each sample's generated tokens (the
    stopping token included); `finish_reasons` are "stop" (EOS, stop token or stop string) or
    "length" (`max_new_tokens` reached). `policy_version` is the engine's weight version the
    whole batch was generated with.
    """

    prompt_index: torch.Tensor  # [N] long
    sample_index: torch.Tensor  # [N] long
    prompt_ids: list[list[int]]  # per sample
    tokens: torch.Tensor  # [N, T] long
    lengths: torch.Tensor  # [N] long
    logprobs: torch.Tensor  # [N, T] float32, as sampled
    raw_logprobs: torch.Tensor  # [N, T] float32, raw model
    finish_reasons: list[str]
    policy_version: int
    pad_id: int
    texts: list[str]

    def __len__(self) -> int:
        return len(self.finish_reasons)

    def mask(self) -> torch.Tensor:
        """[N, T] bool: True on generated tokens, False on padding."""
        return torch.arange(self.tokens.shape[1]) < self.lengths[:, None]

    @classmethod
    def from_generation(cls, out: GenerationOutput, pad_id: int, policy_version: int) -> RolloutBatch:
        """Pad the per-sample lists of a `GenerationOutput` into tensors."""
        count = len(out.token_ids)
        width = max((len(t) for t in out.token_ids), default=0)
        tokens = torch.full((count, width), pad_id, dtype=torch.long)
        logprobs = torch.zeros(count, width, dtype=torch.float32)
        raw = torch.zeros(count, width, dtype=torch.float32)
        for i, (ids, lp, rlp) in enumerate(zip(out.token_ids, out.logprobs, out.raw_logprobs, strict=True)):
            tokens[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            logprobs[i, : len(lp)] = torch.tensor(lp, dtype=torch.float32)
            raw[i, : len(rlp)] = torch.tensor(rlp, dtype=torch.float32)
        return cls(
            prompt_index=torch.tensor(out.prompt_index, dtype=torch.long),
            sample_index=torch.tensor(out.sample_index, dtype=torch.long),
            prompt_ids=out.prompt_ids,
            tokens=tokens,
            lengths=torch.tensor([len(t) for t in out.token_ids], dtype=torch.long),
            logprobs=logprobs,
            raw_logprobs=raw,
            finish_reasons=out.finish_reasons,
            policy_version=policy_version,
            pad_id=pad_id,
            texts=out.texts,
        )


@runtime_checkable
class GenerationEngine(Protocol):
    """What the RL driver needs from a generation engine (native, vLLM, ...)."""

    @property
    def policy_version(self) -> int:
        """The version of the weights `generate` uses now (set or counted by `update_weights`)."""
        ...

    def generate(
        self,
        prompt_ids: list[list[int]],
        sampling: SamplingParams,
        n: int = 1,
        seed: int = 0,
        prompt_index: Sequence[int] | None = None,
    ) -> RolloutBatch:
        """`n` samples of every prompt. Sample `s` of prompt `p` depends only on the weights and
        `(seed, prompt_index[p], s)` (`prompt_index` defaults to `0..P-1`; pass global indices
        when prompts are split over engines), not on the other prompts or on `n`."""
        ...

    def update_weights(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int | None = None
    ) -> None:
        """Replace the weights with Hugging Face-named full tensors, streamed one at a time; then
        the policy version is `version`, or the previous one plus 1."""
        ...

    def sleep(self, level: int = 1) -> None:
        """Release memory while another process (a trainer) needs it; `generate` fails until
        `wake()`. What each level keeps is engine-specific and documented there."""
        ...

    def wake(self) -> None:
        """Undo `sleep`."""
        ...
