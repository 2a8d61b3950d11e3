"""Every config template in configs/ validates against the current config models."""

from __future__ import annotations

from pathlib import Path

import pytest

from posttrain.config import SFTConfig, load_config
from posttrain.config.distill import DistillConfig
from posttrain.config.dpo import DPOConfig
from posttrain.config.grpo import GRPOConfig
from posttrain.demo_task import write_task

REPO = Path(__file__).resolve().parents[3]
PIPELINES = sorted((REPO / "configs").glob("pipeline_*.yaml"))
CONFIGS = sorted(set((REPO / "configs").glob("*.yaml")) - set(PIPELINES))
HH_PAIRS = REPO.parent / "shared" / "data" / "hh_harmless_pairs.jsonl.gz"


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_template_validates(path, tmp_path, monkeypatch, gsm8k_path):
    monkeypatch.chdir(REPO)
    train, held_out = write_task(tmp_path)
    overrides = []
    if path.name in ("demo.yaml", "grpo_demo_addition.yaml"):
        overrides = [f"data.sources.0.path={train}", f"eval.sources.0.path={held_out}"]
    elif "gsm8k" in path.name:  # the configs name a user's data/ copy; tests read the shared one
        overrides = [f"data.sources.0.path={gsm8k_path}", f"eval.sources.0.path={gsm8k_path}"]
    elif "_hh" in path.name:  # a user's data/ copy of HH-RLHF; tests read the shared sample
        overrides = [f"data.sources.0.path={HH_PAIRS}", f"eval.sources.0.path={HH_PAIRS}"]
        if not HH_PAIRS.exists():
            pytest.skip(f"shared data not found at {HH_PAIRS}")
    if path.name.startswith("grpo_"):  # they start from an SFT export made first; any model validates
        overrides.append("model.path=smollm2-135m-instruct")
    config_class = {"dpo": DPOConfig, "grpo": GRPOConfig, "distill": DistillConfig}.get(path.name.split("_")[0], SFTConfig)
    cfg = load_config(path, overrides, config_class)
    assert cfg.name and cfg.data.sources


@pytest.mark.parametrize("path", [p for p in CONFIGS if "gsm8k" in p.name], ids=lambda p: p.name)
def test_gsm8k_configs_say_how_to_get_the_data(path):
    """A user's checkout has no ../shared: the configs point into data/ and say how to fill it."""
    text = path.read_text()
    assert "../shared" not in text
    assert "path: data/gsm8k_train.jsonl" in text and "path: data/gsm8k_test.jsonl" in text
    assert "grade_school_math/data/$s.jsonl" in text


def test_hh_config_says_how_to_get_the_data():
    text = (REPO / "configs" / "dpo_smollm2_hh.yaml").read_text()
    assert "../shared" not in text
    assert "path: data/hh_harmless_train.jsonl.gz" in text and "path: data/hh_harmless_test.jsonl.gz" in text
    assert "hh-rlhf/master/harmless-base/$s.jsonl.gz" in text


@pytest.mark.parametrize("path", PIPELINES, ids=[p.name for p in PIPELINES])
def test_pipeline_validates_every_stage(path, tmp_path, monkeypatch, gsm8k_path):
    from posttrain.config.loading import load_config as load
    from posttrain.config.pipeline import PipelineConfig
    from posttrain.pipeline.plan import plan

    monkeypatch.chdir(REPO)
    train, held_out = write_task(tmp_path)
    if "gsm8k" in path.name:
        train = held_out = gsm8k_path
    pipeline = load(path, [f"output_dir={tmp_path / 'runs'}"], PipelineConfig)
    data = [f"data.sources.0.path={train}", f"eval.sources.0.path={held_out}"]
    for stage in pipeline.stages:
        if stage.recipe == "eval":
            stage.config["sources"][0]["path"] = str(held_out)
        else:
            stage.overrides = [*stage.overrides, *data]
    stages = plan(pipeline, path.parent)
    assert [s.recipe for s in stages] == ["sft", "grpo", "eval"]
    assert stages[1].refs == ["sft"] and stages[2].refs == ["grpo"]
