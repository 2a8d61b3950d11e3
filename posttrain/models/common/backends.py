"""Attention backends behind one interface.

A backend is a function
`(q [B, H, Lq, D], k [B, Hkv, Lk, D], v [B, Hkv, Lk, D], meta, window, scale) -> [B, H, Lq, D]`
where `meta` is an `AttentionMeta` (never None here: the decoder builds a causal one) and `window`
the sliding window of the layer (None for full attention). Grouped-query attention is handled by
every backend without materialising repeated keys, except `sdpa` on CUDA where only a repeat keeps
it off the math kernel (see `sdpa_expands_kv`).

* `sdpa`: `torch.nn.functional.scaled_dot_product_attention` with a dense boolean mask
  (document-causal, padding, sliding window); the causal fast path when nothing else applies.
  On CPU, for full attention without a KV cache, it runs each document of a packed row as its
  own causal call instead: with a dense mask the CPU kernel computes every (query, key) block of
  the row, per document only the causal blocks of each document (see `sdpa_per_document`). The
  CPU path stays eager inside compiled blocks (a graph break around attention).
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


def _per_document(meta: AttentionMeta, window: int | None, device_type: str) -> bool:
    """Whether the CPU per-document path may apply: CPU, full attention, no KV cache."""
    return device_type == "cpu" and window is None and meta.q_offset == 0 and not meta.plain_causal


def document_runs(meta: AttentionMeta) -> list[list[int]] | None:
    """Per row, the lengths of its runs of equal segment ids (documents; padding is a run too).

    None when some segment id occurs in two runs of one row (a padding mask with holes): its
    runs would see each other under the dense rule, so the per-document path does not apply.
    """
    cu, _ = meta.varlen_boundaries()
    bounds, runs, length = cu.tolist(), [[] for _ in range(meta.batch_size)], meta.q_len
    for start, end in zip(bounds[:-1], bounds[1:]):
        runs[start // length].append(end - start)
    distinct = [len(row.unique()) for row in meta.q_segments]
    return runs if all(len(r) == d for r, d in zip(runs, distinct)) else None


def _prepare_sdpa(meta: AttentionMeta, window: int | None) -> None:
    if _per_document(meta, window, meta.q_segments.device.type):
        if meta.cached("runs", lambda: document_runs(meta)) is not None:
            return
    if not _sdpa_causal_fast_path(meta, window):
        meta.cached(("sdpa", window), lambda: dense_mask(meta, window))


def sdpa_per_document(q, k, v, runs: list[list[int]], scale: float) -> torch.Tensor:
    """Causal SDPA on each document of each row, outputs concatenated back in place.

    `runs[b]` are row `b`'s document lengths (they sum to the row length). Splitting by
    `torch.split` keeps the backward one concatenation per tensor.
    """
    gqa = q.shape[1] != k.shape[1]
    rows = []
    for b, lengths in enumerate(runs):
        qs, ks, vs = (x[b : b + 1].split(lengths, dim=2) for x in (q, k, v))
        parts = [F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, scale=scale, enable_gqa=gqa)
                 for qd, kd, vd in zip(qs, ks, vs)]
        rows.append(torch.cat(parts, dim=2) if len(parts) > 1 else parts[0])
    return torch.cat(rows, dim=0) if len(rows) > 1 else rows[0]


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
    if q.device.type == "cpu":
        return _sdpa_cpu(q, k, v, meta, window, scale)
    return _sdpa_dense(q, k, v, meta, window, scale)


@torch.compiler.disable
def _sdpa_cpu(q, k, v, meta: AttentionMeta, window: int | None, scale: float) -> torch.Tensor:
    """Always eager, even inside a compiled block: the per-document lengths are a Python list,
    which compiled code would specialise on (one recompilation per batch layout)."""
    runs = meta.cached("runs", lambda: document_runs(meta)) if _per_document(meta, window, "cpu") else None
    if runs is not None:
        return sdpa_per_document(q, k, v, runs, scale)
    return _sdpa_dense(q, k, v, meta, window, scale)


def _sdpa_dense(q, k, v, meta: AttentionMeta, window: int | None, scale: float) -> torch.Tensor:
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
