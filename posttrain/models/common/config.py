"""`ModelArgs`: everything the shared decoder needs to know, independent of any model family.

Family specs (`posttrain/models/<family>/`) translate a Hugging Face `config.json` into these
fields and back; the decoder itself never looks at a `model_type`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"
VOCAB_PAD_MULTIPLE = 64


@dataclass(frozen=True)
class RopeArgs:
    """Rotary embedding of one layer type.

    `scaling` is `"default"` (plain RoPE), `"linear"` (positions divided by `factor`) or
    `"llama3"` (Llama 3.1 frequency-dependent interpolation, uses the `*_freq_factor` fields and
    `original_max_position_embeddings`).
    """

    theta: float = 10_000.0
    scaling: Literal["default", "linear", "llama3"] = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass
class ModelArgs:
    """Shape and numerics of a decoder-only transformer.

    Attributes that only some families use default to the plain Llama behaviour, so a Llama model
    needs nothing beyond the sizes.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    # One entry per layer: FULL_ATTENTION or SLIDING_ATTENTION.
    layer_types: list[str] = field(default_factory=list)
    sliding_window: int | None = None  # tokens a sliding layer sees, itself included
    # RoPE per layer type (a sliding layer may use its own base, as in Gemma 3).
    rope: dict[str, RopeArgs] = field(default_factory=lambda: {FULL_ATTENTION: RopeArgs()})
    attention_bias: bool = False  # bias on q/k/v projections
    output_bias: bool = False  # bias on the attention output projection
    mlp_bias: bool = False
    qk_norm: bool = False  # RMSNorm over head_dim on queries and keys before RoPE
    sandwich_norm: bool = False  # extra norms after attention and after the MLP (Gemma)
    norm_unit_offset: bool = False  # norm scales by (1 + w) and multiplies in fp32 (Gemma)
    embed_scale: float | None = None  # embeddings multiplied by this (Gemma: sqrt(hidden))
    activation: Literal["silu", "gelu", "gelu_tanh"] = "silu"
    attn_scale: float | None = None  # softmax scale; None means head_dim ** -0.5
    final_logit_softcap: float | None = None
    tie_embeddings: bool = False
    pad_vocab_multiple: int = VOCAB_PAD_MULTIPLE

    def __post_init__(self) -> None:
        if not self.layer_types:
            self.layer_types = [FULL_ATTENTION] * self.num_layers
        if len(self.layer_types) != self.num_layers:
            raise ValueError(
                f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers; "
                "give one per layer"
            )
        for kind in set(self.layer_types):
            if kind not in (FULL_ATTENTION, SLIDING_ATTENTION):
                raise ValueError(
                    f"unknown layer type {kind!r}; "
                    f"expected {FULL_ATTENTION!r} or {SLIDING_ATTENTION!r}"
                )
            if kind not in self.rope:
                raise ValueError(f"no rope settings for layer type {kind!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads})"
            )

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_multiple
        return (self.vocab_size + m - 1) // m * m

    @property
    def softmax_scale(self) -> float:
        return self.attn_scale if self.attn_scale is not None else self.head_dim**-0.5

    def window_for(self, layer: int) -> int | None:
        """The sliding window of `layer`, or None when it attends to the whole prefix."""
        if self.layer_types[layer] == SLIDING_ATTENTION:
            return self.sliding_window
        return None
