"""Key/value cache for incremental decoding, allocated lazily from the first keys it receives."""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of every layer for `batch_size` rows of up to `max_len` slots.

    The decoder writes a forward's new keys/values at slots `[length, length + L)` of each layer
    and advances `length` once all layers have run. Slots are shared by all rows, so left-padded
    prompts occupy the same slots and padding is excluded by the attention metadata.

    A layer's buffers are allocated on its first `update`, with the dtype, key/value head count,
    head size and device of the keys it receives: that is the compute's, which can differ from the
    stored weights' (FSDP2 mixed precision gathers fp32 weights as bf16; under tensor parallelism
    a rank holds `num_kv_heads / tp` heads).
    """

    def __init__(self, num_layers: int, batch_size: int, max_len: int):
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.batch_size = batch_size
        self.max_len = max_len
        self.length = 0
        self._scatter: tuple[torch.Tensor, torch.Tensor, int] | None = None

    def scatter_next(self, rows: torch.Tensor, slots: torch.Tensor, new_length: int) -> None:
        """Make the next forward a packed prefill: its single row holds several prompts, token `t`
        is stored at batch row `rows[t]`, slot `slots[t]`, and afterwards `new_length` slots count
        as used. The forward itself attends within the packed row (use `packed_attention`)."""
        self._scatter = (rows, slots, new_length)

    def _allocate(self, layer: int, k: torch.Tensor) -> None:
        shape = (self.batch_size, k.shape[1], self.max_len, k.shape[3])
        self.keys[layer] = torch.zeros(shape, dtype=k.dtype, device=k.device)
        self.values[layer] = torch.zeros(shape, dtype=k.dtype, device=k.device)

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store `k, v [B, Hkv, L, D]` after the cached slots; return all keys/values so far
        (during a packed prefill: store them scattered and return them unchanged)."""
        if self.keys[layer] is None:
            self._allocate(layer, k)
        keys, values = self.keys[layer], self.values[layer]
        if self._scatter is not None:
            rows, slots, _ = self._scatter
            keys[rows, :, slots] = k[0].transpose(0, 1)
            values[rows, :, slots] = v[0].transpose(0, 1)
            return k, v
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} slots; {end} needed")
        keys[:, :, self.length : end] = k
        values[:, :, self.length : end] = v
        return keys[:, :, :end], values[:, :, :end]

    def advance(self, n: int) -> None:
        if self._scatter is not None:
            self.length, self._scatter = self._scatter[2], None
            return
        self.length += n

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep batch rows `rows`, in that order (e.g. the unfinished sequences); an index may
        repeat, which copies a row (several samples of one prompt). Copies the used slots."""
        self.batch_size = len(rows)
        for store in (self.keys, self.values):
            for layer, old in enumerate(store):
                if old is None:
                    continue
                new = old.new_empty((len(rows), *old.shape[1:]))
                new[:, :, : self.length] = old[rows, :, : self.length]
                store[layer] = new
