"""Qwen3 family (RMSNorm on queries and keys per head)."""

from posttrain.models.qwen3.spec import SPEC

__all__ = ["SPEC"]
