"""Distillation on two ranks (gloo, torchrun-style processes) reproduces the one-rank run for the
same global batch: FSDP2 over the student (a 2-layer student made on rank 0 from the 4-layer
teacher) with the teacher live and sharded like it, or with a top-k table each rank scores its
share of."""

from __future__ import annotations


import pytest

from posttrain.config import load_config
from posttrain.config.distill import DistillConfig
from posttrain.recipes.distill import STUDENT_DIR, run_distill
from tests.integration.test_distill import distill_config
from tests.integration.test_distributed import STEPS, assert_two_ranks_reproduce_one

@pytest.mark.parametrize("signal", ["live", "topk"])
def test_two_ranks_reproduce_one(teacher_dir, task_dir, tmp_path, signal):
    cfg = distill_config(teacher_dir, task_dir, tmp_path / "one", steps=STEPS,
                         distill={"loss": "jsd", "teacher_signal": signal, "topk": 8})
    cfg["eval"] = {}
    _, two = assert_two_ranks_reproduce_one(cfg, tmp_path, "distill",
                                            lambda path: run_distill(load_config(path, [], DistillConfig)))
    assert (two / STUDENT_DIR / "config.json").is_file()
    if signal == "topk":  # each rank wrote the documents it scored
        parts = sorted(p.name.split("-")[1] for p in (two / "teacher_topk").glob("*/s0-r*-p*.safetensors"))
        assert set(parts) == {"r00000", "r00001"}
