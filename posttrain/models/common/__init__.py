"""The shared decoder definition every family maps onto (see `decoder.py`)."""

from posttrain.models.common.attention import (
    AttentionMeta,
    causal_attention,
    packed_attention,
    padded_attention,
)
from posttrain.models.common.backends import available_backends, get_backend
from posttrain.models.common.config import FULL_ATTENTION, SLIDING_ATTENTION, ModelArgs, RopeArgs
from posttrain.models.common.decoder import Decoder
from posttrain.models.common.kv_cache import KVCache

__all__ = [
    "FULL_ATTENTION",
    "SLIDING_ATTENTION",
    "AttentionMeta",
    "Decoder",
    "KVCache",
    "ModelArgs",
    "RopeArgs",
    "available_backends",
    "causal_attention",
    "get_backend",
    "packed_attention",
    "padded_attention",
]
