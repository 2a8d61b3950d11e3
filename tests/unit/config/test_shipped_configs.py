"""Every config template in configs/ validates against the current config models."""

from __future__ import annotations

from pathlib import Path

import pytest

from posttrain.config import SFTConfig, load_config
from posttrain.demo_task import write_task

REPO = Path(__file__).resolve().parents[3]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_template_validates(path, tmp_path, monkeypatch, gsm8k_path):
    monkeypatch.chdir(REPO)
    train, held_out = write_task(tmp_path)
    overrides = []
    if path.name == "demo.yaml":
        overrides = [f"data.sources.0.path={train}", f"eval.sources.0.path={held_out}"]
    cfg = load_config(path, overrides, SFTConfig)
    assert cfg.name and cfg.data.sources
