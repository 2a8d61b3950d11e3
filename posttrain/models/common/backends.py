"""Attention backends behind one interface.

A backend is a function
`(q [B, H, Lq, D], k [B, Hkv, Lk, D], v [B, Hkv, Lk, D], meta, window, scale) -> [B, H, Lq, D]`
where `meta` is an `AttentionMeta` (never None here: the decoder builds a causal one) and `window`
the sliding window of the layer (None for full attention). Grouped-query attention is handled by
every backend without materialising repeated keys, except `sdpa` on CUDA where only a repeat keeps
it off the math kernel (see `sdpa_expands_kv`).

* `sdpa`: `torch.nn.functional.scaled_dot_product_attention` with a dense boolean mask
  (document-causal, padding, sliding window); the causal fast path when nothing else applies.
* `flex`: FlexAttention with a block mask built from the same rule; compiled on GPU, eager on CPU.
* `flash_varlen`: flash-attn's varlen kernel over `cu_seqlens`; only when `flash_attn` is
  importable, and not for KV-cache decoding (use `sdpa` there).

`prepare_attention(name, meta, windows)` builds a backend's masks ahead of the layers (the decoder
calls it once per forward), so the per-layer calls only read them: no mask building and no host
sync inside blocks that may be compiled. Calling a backend on unprepared metadata still works.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Callable, Iterable
from functools import cache

import torch
import torch.nn.functional as F

from posttrain.models.common.attention import AttentionMeta

Backend = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, AttentionMeta, "int | None", float], torch.Tensor
]


def dense_mask(meta: AttentionMeta, window: int | None) -> torch.Tensor:
    """Boolean `[B, 1, Lq, Lk]` mask, True where a query may see a key."""
    device = meta.q_segments.device
    q_pos = torch.arange(meta.q_len, device=device)[:, None] + meta.q_offset
    k_pos = torch.arange(meta.k_len, device=device)[None, :]
    allowed = k_pos <= q_pos
    if window is not None:
        allowed = allowed & (q_pos - k_pos < window)
    same = meta.q_segments[:, :, None] == meta.k_segments[:, None, :]
    return (allowed[None] & same)[:, None]


def _sdpa_causal_fast_path(meta: AttentionMeta, window: int | None) -> bool:
    return meta.plain_causal and window is None and meta.q_offset == 0


def _prepare_sdpa(meta: AttentionMeta, window: int | None) -> None:
    if not _sdpa_causal_fast_path(meta, window):
        meta.cached(("sdpa", window), lambda: dense_mask(meta, window))


def sdpa_expands_kv(device_type: str, dtype: torch.dtype, masked: bool) -> bool:
    """Whether grouped keys/values must be repeated to full heads before SDPA.

    On CUDA only the flash kernel takes `enable_gqa`, and it takes neither a mask nor fp32; every
    other case would fall back to the math kernel, which materialises `[B, H, Lq, Lk]` scores (and
    keeps them for backward). Repeating the keys/values (`Hkv * rep` heads, a few MiB) instead lets
    the memory-efficient kernel run. CPU's fused kernel handles GQA with a mask, so it never
    repeats.
    """
    if device_type != "cuda":
        return False
    return masked or dtype not in (torch.float16, torch.bfloat16)


def sdpa_attention(q, k, v, meta: AttentionMeta, window: int | None, scale: float) -> torch.Tensor:
    fast = _sdpa_causal_fast_path(meta, window)
    mask = None if fast else meta.cached(("sdpa", window), lambda: dense_mask(meta, window))
    gqa = q.shape[1] != k.shape[1]
    if gqa and sdpa_expands_kv(q.device.type, q.dtype, masked=mask is not None):
        repeats = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(repeats, dim=1), v.repeat_interleave(repeats, dim=1)
        gqa = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=fast, scale=scale, enable_gqa=gqa)


@cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _block_mask(meta: AttentionMeta, window: int | None):
    from torch.nn.attention.flex_attention import create_block_mask

    q_seg, k_seg, offset = meta.q_segments, meta.k_segments, meta.q_offset

    def mask_mod(b, h, q_idx, kv_idx):
        q_pos = q_idx + offset
        ok = (kv_idx <= q_pos) & (q_seg[b, q_idx] == k_seg[b, kv_idx])
        if window is not None:
            ok = ok & (q_pos - kv_idx < window)
        return ok

    return create_block_mask(
        mask_mod, meta.batch_size, None, meta.q_len, meta.k_len, device=q_seg.device
    )


def _prepare_flex(meta: AttentionMeta, window: int | None) -> None:
    meta.cached(("flex", window), lambda: _block_mask(meta, window))


def flex_attention_backend(
    q, k, v, meta: AttentionMeta, window: int | None, scale: float
) -> torch.Tensor:
    from torch.nn.attention.flex_attention import flex_attention

    block_mask = meta.cached(("flex", window), lambda: _block_mask(meta, window))
    gqa = q.shape[1] != k.shape[1]
    if q.device.type == "cuda":
        return _compiled_flex()(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa)
    with warnings.catch_warnings():  # eager on CPU is intended: it is the test path
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        return flex_attention(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa)


def _prepare_flash(meta: AttentionMeta) -> None:
    meta.varlen_boundaries()  # derives cu_seqlens (one host sync) unless the batch brought them


def flash_varlen_attention(
    q, k, v, meta: AttentionMeta, window: int | None, scale: float
) -> torch.Tensor:
    from flash_attn import flash_attn_varlen_func

    if meta.q_offset != 0:
        raise ValueError(
            "flash_varlen does not decode over a KV cache; use the sdpa backend for that"
        )
    batch, heads, length, dim = q.shape
    cu_seqlens, max_seqlen = meta.varlen_boundaries()

    def flat(x: torch.Tensor) -> torch.Tensor:  # [B, H, L, D] -> [B*L, H, D]
        return x.transpose(1, 2).reshape(batch * length, x.shape[1], dim)

    out = flash_attn_varlen_func(
        flat(q),
        flat(k),
        flat(v),
        cu_seqlens_q=cu_seqlens,
        cu_seqlens_k=cu_seqlens,
        max_seqlen_q=max_seqlen,
        max_seqlen_k=max_seqlen,
        softmax_scale=scale,
        causal=True,
        window_size=(window - 1, 0) if window is not None else (-1, -1),
    )
    return out.view(batch, length, heads, dim).transpose(1, 2)


BACKENDS: dict[str, Backend] = {
    "sdpa": sdpa_attention,
    "flex": flex_attention_backend,
    "flash_varlen": flash_varlen_attention,
}
_PREPARE: dict[str, Callable[[AttentionMeta, int | None], None]] = {
    "sdpa": _prepare_sdpa,
    "flex": _prepare_flex,
    "flash_varlen": lambda meta, window: _prepare_flash(meta),
}


def prepare_attention(name: str, meta: AttentionMeta, windows: Iterable[int | None]) -> None:
    """Build backend `name`'s masks for every window size in `windows` once, up front."""
    for window in set(windows):
        _PREPARE[name](meta, window)


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def available_backends() -> list[str]:
    """Backends usable in this environment."""
    return [name for name in BACKENDS if name != "flash_varlen" or flash_attn_available()]


def get_backend(name: str) -> Backend:
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {sorted(BACKENDS)}")
    if name == "flash_varlen" and not flash_attn_available():
        raise ValueError(
            "attention backend 'flash_varlen' needs the flash-attn package; install it on a GPU "
            "machine or choose 'sdpa' or 'flex'"
        )
    return BACKENDS[name]
