"""Gemma 3 text family: q/k norms, sandwich norms with `1 + w` scales, scaled embeddings,
sliding-window layers with their own RoPE base, tied head."""

from posttrain.models.gemma3.spec import SPEC

__all__ = ["SPEC"]
