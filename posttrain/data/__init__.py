"""Data: sources, chat rendering with loss masks, packing, mixing and the resumable loader.

The single entry point for trainers is `build_loader(cfg, tokenizer, batch_size=..., rank=...,
world_size=..., seed=...)`; it yields `PackedBatch`es (see `posttrain.data.batch`).
"""

from posttrain.data.batch import IGNORE_INDEX, PackedBatch, Sample, collate
from posttrain.data.chat import ChatRenderer, PromptSample, Rendered, render_messages
from posttrain.data.loader import DataCounters, DataLoader, Pipeline, build_loader
from posttrain.data.sources import DataError

__all__ = [
    "IGNORE_INDEX",
    "ChatRenderer",
    "DataCounters",
    "DataError",
    "DataLoader",
    "PackedBatch",
    "Pipeline",
    "PromptSample",
    "Rendered",
    "Sample",
    "build_loader",
    "collate",
    "render_messages",
]
