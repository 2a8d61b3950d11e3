"""The one decoder-only transformer every supported family maps onto.

`Decoder(args)(input_ids, position_ids, attn) -> hidden [B, L, d]` (final norm applied, no LM
head). The head weight is `decoder.head_weight` (`[padded_vocab, d]`, tied to the embedding or
not) for the chunked-loss ops; `decoder.logits(hidden)` projects for generation and verification,
with the padded vocabulary entries set to -inf.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from posttrain.models.common.attention import AttentionMeta, causal_attention, padded_attention
from posttrain.models.common.backends import get_backend, prepare_attention
from posttrain.models.common.config import ModelArgs
from posttrain.models.common.kv_cache import KVCache
from posttrain.models.common.mlp import GatedMLP
from posttrain.models.common.norms import RMSNorm
from posttrain.models.common.rope import RotaryEmbedding, apply_rotary


class Attention(nn.Module):
    """Grouped-query self-attention with optional q/k norms and a per-layer sliding window."""

    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.layer = layer
        self.num_heads = args.num_heads
        self.num_kv_heads = args.num_kv_heads
        self.head_dim = args.head_dim
        self.window = args.window_for(layer)
        self.scale = args.softmax_scale
        d = args.hidden_size
        self.wq = nn.Linear(d, self.num_heads * self.head_dim, bias=args.attention_bias)
        self.wk = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=args.attention_bias)
        self.wv = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=args.attention_bias)
        self.wo = nn.Linear(self.num_heads * self.head_dim, d, bias=args.output_bias)
        if args.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, args.norm_eps, args.norm_unit_offset)
            self.k_norm = RMSNorm(self.head_dim, args.norm_eps, args.norm_unit_offset)
        else:
            self.q_norm = self.k_norm = None

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        attn: AttentionMeta,
        backend: str,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        batch, length, _ = x.shape
        # Head counts come from the projections' widths: under tensor parallelism each rank
        # holds a slice of the heads (`num_heads / tp`), on one device all of them.
        q = self.wq(x).view(batch, length, -1, self.head_dim)
        k = self.wk(x).view(batch, length, -1, self.head_dim)
        v = self.wv(x).view(batch, length, -1, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        cos, sin = rope
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        out = get_backend(backend)(q, k, v, attn, self.window, self.scale)
        return self.wo(out.transpose(1, 2).reshape(batch, length, -1))


class Block(nn.Module):
    """Pre-norm residual block; Gemma adds norms after attention and after the MLP."""

    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.layer_type = args.layer_types[layer]

        def norm() -> RMSNorm:
            return RMSNorm(args.hidden_size, args.norm_eps, args.norm_unit_offset)

        self.attention_norm = norm()
        self.attention = Attention(args, layer)
        self.ffn_norm = norm()
        self.feed_forward = GatedMLP(
            args.hidden_size, args.intermediate_size, args.activation, bias=args.mlp_bias
        )
        self.post_attention_norm = norm() if args.sandwich_norm else None
        self.post_ffn_norm = norm() if args.sandwich_norm else None

    def forward(self, x, rope, attn: AttentionMeta, backend: str, cache: KVCache | None = None):
        h = self.attention(self.attention_norm(x), rope, attn, backend, cache)
        if self.post_attention_norm is not None:
            h = self.post_attention_norm(h)
        x = x + h
        h = self.feed_forward(self.ffn_norm(x))
        if self.post_ffn_norm is not None:
            h = self.post_ffn_norm(h)
        return x + h


class Decoder(nn.Module):
    """Embedding, blocks, final norm; plus the (possibly tied) LM head weight.

    The vocabulary is padded to `args.padded_vocab_size` rows; `vocab_size` is the real size.
    `attention_backend` ("sdpa", "flex", "flash_varlen") can be changed at any time.
    """

    # Where the model came from when loaded by `posttrain.models.hf.load_hf` (else None).
    hf_source = None

    def __init__(self, args: ModelArgs, attention_backend: str = "sdpa"):
        super().__init__()
        self.args = args
        self.attention_backend = attention_backend
        self.tok_embeddings = nn.Embedding(args.padded_vocab_size, args.hidden_size)
        self.rotary = nn.ModuleDict(
            {kind: RotaryEmbedding(rope, args.head_dim) for kind, rope in args.rope.items()}
        )
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.norm_eps, args.norm_unit_offset)
        self.output = (
            None
            if args.tie_embeddings
            else nn.Linear(args.hidden_size, args.padded_vocab_size, bias=False)
        )
        self.fp32_head: torch.Tensor | None = None
        """When set (by a generation engine), `logits` projects fp32 hidden states through this fp32
        copy of the head: the head and its softmax in fp32 over lower-precision weights."""

    # -- the head, for ops and generation -------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """The real vocabulary size (rows beyond it are padding)."""
        return self.args.vocab_size

    @property
    def padded_vocab_size(self) -> int:
        return self.args.padded_vocab_size

    @property
    def head_weight(self) -> torch.Tensor:
        """LM head weight `[padded_vocab, d]`; rows `>= vocab_size` are padding to be excluded."""
        return self.tok_embeddings.weight if self.output is None else self.output.weight

    @property
    def final_logit_softcap(self) -> float | None:
        """When set, logits are `cap * tanh(logits / cap)` (Gemma); losses must apply it too."""
        return self.args.final_logit_softcap

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., d] -> logits [..., padded_vocab] in hidden's dtype (fp32 with `fp32_head`);
        padding is -inf."""
        if self.fp32_head is not None:
            logits = F.linear(hidden.float(), self.fp32_head)
        else:
            logits = F.linear(hidden, self.head_weight)
        cap = self.args.final_logit_softcap
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        if self.padded_vocab_size != self.vocab_size:
            logits[..., self.vocab_size :] = float("-inf")
        return logits

    # -- forward ---------------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(input_ids)
        if self.args.embed_scale is not None:
            # Rounded to the weight dtype first, as the reference implementation does.
            h = h * torch.tensor(self.args.embed_scale, dtype=h.dtype, device=h.device)
        return h

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attn: AttentionMeta | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """input_ids [B, L] -> hidden [B, L, d].

        `position_ids` default to `0..L-1` per row (continuing after a cache's slots). `attn=None`
        means causal attention within each row. With `cache`, the new keys/values are appended
        and `attn` must describe all cached slots plus these (see `padded_attention`).
        """
        batch, length = input_ids.shape
        start = cache.length if cache is not None else 0
        if position_ids is None:
            steps = torch.arange(start, start + length, device=input_ids.device)
            position_ids = steps.expand(batch, -1)
        if attn is None:
            if cache is None:
                attn = causal_attention(batch, length, input_ids.device)
            else:
                attn = padded_attention(
                    torch.ones(batch, start + length, dtype=torch.int32, device=input_ids.device),
                    query_len=length,
                )
        backend = self.attention_backend
        if cache is not None and backend == "flash_varlen":
            backend = "sdpa"
        get_backend(backend)  # fail early on an unknown or unavailable backend
        prepare_attention(backend, attn, (block.attention.window for block in self.layers))
        h = self.embed(input_ids)
        ropes = {kind: rotary(position_ids, h.dtype) for kind, rotary in self.rotary.items()}
        for block in self.layers:
            h = block(h, ropes[block.layer_type], attn, backend, cache)
        if cache is not None:
            cache.advance(length)
        return self.norm(h)

    # -- initialisation ---------------------------------------------------------------------------
    def init_buffers(self, device: torch.device | str | None = None) -> None:
        """Compute the non-persistent buffers (RoPE frequencies) on `device` (default: in place)."""
        for rotary in self.rotary.values():
            rotary.reset_buffers(device)

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """Random init for training from scratch or tests (normal weights, zero biases)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, RMSNorm):
                module.reset_parameters()
        self.zero_vocab_padding()
        self.init_buffers()

    @torch.no_grad()
    def zero_vocab_padding(self) -> None:
        """Padded embedding/head rows are zero so they carry nothing into or out of the model."""
        self.tok_embeddings.weight[self.vocab_size :].zero_()
        if self.output is not None:
            self.output.weight[self.vocab_size :].zero_()

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        """An empty cache for `batch_size` rows of `max_len` slots; each layer's buffers take the
        dtype, head count and device of its first keys (the compute's, not the stored weights')."""
        return KVCache(self.args.num_layers, batch_size, max_len)
