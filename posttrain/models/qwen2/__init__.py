"""Qwen2 / Qwen2.5 family (bias on the q/k/v projections)."""

from posttrain.models.qwen2.spec import SPEC

__all__ = ["SPEC"]
