"""Shared fixtures: tiny random Hugging Face checkpoints built in code (no downloads)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from tests.tiny_models import FAMILIES, build_tiny_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """One tiny random HF checkpoint directory per supported family."""
    root = tmp_path_factory.mktemp("tiny_models")
    return {family: build_tiny_checkpoint(family, root / family) for family in FAMILIES}


@pytest.fixture(scope="session", params=FAMILIES)
def tiny_checkpoint(request, tiny_checkpoints) -> Path:
    """Parametrised over every family: the tiny checkpoint directory."""
    return tiny_checkpoints[request.param]


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The imported SmolLM2-135M-Instruct HF directory (imported once, then cached)."""
    from posttrain.models.hub import import_model

    return import_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def gsm8k_path() -> Path:
    path = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gsm8k_train.jsonl"
    if not path.exists():
        pytest.skip(f"shared data not found at {path}")
    return path
