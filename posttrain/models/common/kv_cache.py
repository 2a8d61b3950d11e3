"""Preallocated key/value cache for incremental decoding."""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of every layer for `batch_size` rows of up to `max_len` slots.

    The decoder writes a forward's new keys/values at slots `[length, length + L)` of each layer
    and advances `length` once all layers have run. Slots are shared by all rows, so left-padded
    prompts occupy the same slots and padding is excluded by the attention metadata.
    """

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        shape = (batch_size, num_kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_len = max_len
        self.length = 0
        self._scatter: tuple[torch.Tensor, torch.Tensor, int] | None = None

    def scatter_next(self, rows: torch.Tensor, slots: torch.Tensor, new_length: int) -> None:
        """Make the next forward a packed prefill: its single row holds several prompts, token `t`
        is stored at batch row `rows[t]`, slot `slots[t]`, and afterwards `new_length` slots count
        as used. The forward itself attends within the packed row (use `packed_attention`)."""
        self._scatter = (rows, slots, new_length)

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store `k, v [B, Hkv, L, D]` after the cached slots; return all keys/values so far
        (during a packed prefill: store them scattered and return them unchanged)."""
        if self._scatter is not None:
            rows, slots, _ = self._scatter
            self.keys[layer][rows, :, slots] = k[0].transpose(0, 1)
            self.values[layer][rows, :, slots] = v[0].transpose(0, 1)
            return k, v
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} slots; {end} needed")
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, n: int) -> None:
        if self._scatter is not None:
            self.length, self._scatter = self._scatter[2], None
            return
        self.length += n

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only batch rows `rows` (e.g. the unfinished sequences); copies the used slots."""
        for store in (self.keys, self.values):
            for layer, old in enumerate(store):
                new = old.new_empty((len(rows), *old.shape[1:]))
                new[:, :, : self.length] = old[rows, :, : self.length]
                store[layer] = new
