"""Rotary position embeddings: inverse frequencies (plain, linear, Llama 3) and their application.

Rotation uses the "rotate half" layout of the Hugging Face checkpoints: the first and second
halves of each head dimension form the (real, imaginary) pairs.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from posttrain.models.common.config import RopeArgs


def inverse_frequencies(rope: RopeArgs, head_dim: int, device=None) -> torch.Tensor:
    """The `head_dim // 2` rotation frequencies for `rope`, in fp32."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    inv_freq = 1.0 / (rope.theta**exponents)
    if rope.scaling == "default":
        return inv_freq
    if rope.scaling == "linear":
        return inv_freq / rope.factor
    if rope.scaling == "llama3":
        return _llama3_scale(inv_freq, rope)
    raise ValueError(
        f"unsupported rope scaling {rope.scaling!r}; expected default, linear or llama3"
    )


def _llama3_scale(inv_freq: torch.Tensor, rope: RopeArgs) -> torch.Tensor:
    """Llama 3.1 scaling: long wavelengths are slowed by `factor`, short ones kept, and the band
    between them interpolated smoothly."""
    context = rope.original_max_position_embeddings
    long_wavelen = context / rope.low_freq_factor  # above this: divide by factor
    short_wavelen = context / rope.high_freq_factor  # below this: unchanged
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > long_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (context / wavelen - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor
    )
    blended = (1 - smooth) * scaled / rope.factor + smooth * scaled
    in_band = (wavelen >= short_wavelen) & (wavelen <= long_wavelen)
    return torch.where(in_band, blended, scaled)


class RotaryEmbedding(nn.Module):
    """Computes (cos, sin) tables for given position ids; one instance per layer type."""

    def __init__(self, rope: RopeArgs, head_dim: int):
        super().__init__()
        self.rope = rope
        self.head_dim = head_dim
        self.register_buffer("inv_freq", torch.empty(head_dim // 2), persistent=False)
        self.reset_buffers()

    def reset_buffers(self, device: torch.device | str | None = None) -> None:
        """(Re)compute `inv_freq` on `device` (default: where it is); call after a `meta` build."""
        device = device if device is not None else self.inv_freq.device
        if torch.device(device).type != "meta":
            self.inv_freq = inverse_frequencies(self.rope, self.head_dim, device)

    def forward(
        self, position_ids: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [B, L] -> cos, sin [B, L, head_dim], computed in fp32, cast to `dtype`."""
        angles = position_ids[..., None].float() * self.inv_freq.float()
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, H, L, D] by cos/sin [B, L, D]."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + _rotate_half(x) * sin
