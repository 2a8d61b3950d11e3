"""Sharded load of SmolLM2 on 2 ranks: no rank comes near holding the whole model."""

from __future__ import annotations

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "sharded_load.py"


def _bench():
    spec = importlib.util.spec_from_file_location("sharded_load_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_each_rank_peak_rss_growth_stays_under_60_percent_of_the_model(smollm2_dir):
    reports = _bench().measure(smollm2_dir, world=2)
    assert [r["rank"] for r in reports] == [0, 1]
    for r in reports:
        full = r["full_fp32_bytes"]
        assert abs(r["held_bytes"] - full / 2) < 0.01 * full, r  # its half of every tensor
        growth = r["growth_bytes"] + r["warmup_bytes"]  # everything since the process was ready
        assert growth < 0.6 * full, (r, growth / full)
