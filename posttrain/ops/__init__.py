"""Chunked losses through the LM head: never materialise the `[tokens, vocab]` logits."""

from posttrain.ops.kl import linear_kl
from posttrain.ops.linear_ce import linear_cross_entropy
from posttrain.ops.logprobs import linear_logprobs

__all__ = ["linear_cross_entropy", "linear_kl", "linear_logprobs"]
