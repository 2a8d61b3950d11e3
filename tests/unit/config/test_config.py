"""Config loading: YAML + dotted overrides, validation messages, resolved save, hashing."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from pydantic import BaseModel

from posttrain import config as C
from posttrain.config import ConfigError, SFTConfig, load_config, save_resolved

BASE = """\
name: demo
model:
  path: model
data:
  sources:
    - path: train.jsonl
      fields: {question: user, answer: assistant}
  max_length: 256
train:
  steps: 10
  lr: 1e-4
  warmup_steps: 2
"""


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake HF model dir and a data file; paths in configs are relative to the cwd."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "train.jsonl").write_text('{"question": "q", "answer": "a"}\n')
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def load(workdir: Path, overrides: list[str] = (), text: str = BASE) -> SFTConfig:
    return load_config(write(workdir / "cfg.yaml", text), list(overrides), SFTConfig)


def error_of(workdir: Path, overrides: list[str] = (), text: str = BASE) -> str:
    with pytest.raises(ConfigError) as info:
        load(workdir, overrides, text)
    return str(info.value)


def test_minimal_config_fills_defaults(workdir):
    cfg = load(workdir)
    assert cfg.train.lr == 1e-4  # `1e-4` is a float, not a string (YAML 1.2 style)
    assert cfg.train.schedule == "cosine" and cfg.train.precision == "fp32"
    assert cfg.model.dtype == "float32"  # auto resolved from the precision
    assert cfg.run_dir == Path("runs") / "demo"
    assert cfg.tracking.tensorboard and cfg.tracking.jsonl and not cfg.tracking.mlflow
    assert cfg.checkpoint.resume == "auto" and not cfg.lora.enabled


def test_overrides_parse_yaml_values(workdir):
    cfg = load(
        workdir,
        [
            "train.lr=2e-5",
            "train.betas=[0.8, 0.95]",
            "train.precision=bf16_autocast",
            "eval.max_samples=8",  # creates nothing new: eval exists with defaults
            "lora.target_modules=[q_proj, v_proj]",
            "data.sources.0.weight=2",
            "tracking.wandb=off",  # YAML reads `off` as false
            "train.grad_clip=null",
        ],
    )
    assert cfg.train.lr == 2e-5 and cfg.train.betas == (0.8, 0.95)
    assert cfg.train.precision == "bf16_autocast" and cfg.model.dtype == "float32"
    assert cfg.eval.max_samples == 8 and not cfg.eval.enabled
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.data.sources[0].weight == 2.0
    assert cfg.tracking.wandb == "off"
    assert cfg.train.grad_clip is None


def test_unknown_key_names_path_line_and_suggestion(workdir):
    text = BASE + "  lrr: 3\n"
    message = error_of(workdir, text=text)
    assert "train.lrr: unknown key; did you mean train.lr?" in message
    assert "cfg.yaml:13" in message
    assert "keys allowed in train:" in message


def test_unknown_key_in_the_wrong_section_points_to_the_right_one(workdir):
    message = error_of(workdir, ["train.rank=8"])
    assert "train.rank: unknown key; did you mean lora.rank?" in message
    assert "override 'train.rank=8'" in message


def test_bad_value_names_path_value_and_allowed(workdir):
    message = error_of(workdir, ["model.attention=sdpaa", "train.lr=fast"])
    assert "(2 problems)" in message  # reported together
    assert "model.attention: Input should be 'sdpa', 'flex' or 'flash_varlen'" in message
    assert "did you mean 'sdpa'?" in message and "(got 'sdpaa')" in message
    assert "train.lr: Input should be a valid number" in message and "(got 'fast')" in message


def test_out_of_range_and_missing_key(workdir):
    message = error_of(workdir, ["train.lr=-1"])
    assert "train.lr: Input should be greater than 0 (got -1)" in message
    text = BASE.replace("name: demo\n", "")
    assert "name: required key is missing" in error_of(workdir, text=text)


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["train.warmup_steps=20"], "train.warmup_steps: must be <= train.steps (10), got 20"),
        (["train.betas=[0.9, 1.0]"], "train.betas.1: must be in [0, 1), got 1.0"),
        (["train.grad_accum=2", "train.tokens_per_step=4096"], "train.grad_accum: set train.grad_accum"),
        (["train.steps=null", "data.epochs=null"], "train.steps: null (train until the data ends)"),
        (["train.precision=fp32", "model.dtype=bfloat16"], "model.dtype: bfloat16 weights do not go"),
        (["train.precision=bf16"], "train.precision: Input should be 'fp32' or 'bf16_autocast'"),
        (["launcher.address=auto"], "launcher.address: only used with launcher.backend: ray"),
        (["eval.scorer=gsm8k"], "eval.scorer: needs held-out data"),
        (["eval.fraction=0.1"], "eval.fraction: unknown key"),
        (["eval.repetition_penalty=0"], "eval.repetition_penalty: Input should be greater than 0"),
        (["checkpoint.resume=elsewhere"], "checkpoint.resume: expected 'auto', 'never' or an existing path"),
        (["model.path=nowhere"], "model.path: 'nowhere' is neither an existing directory nor a bundled"),
        (["data.sources.0.path=missing.jsonl"], "data.sources.0.path: no such file or directory: 'missing.jsonl'"),
        (["name=a/b"], "name: String should match pattern"),
    ],
)
def test_cross_field_and_filesystem_checks(workdir, overrides, expected):
    assert expected in error_of(workdir, overrides)


def test_max_length_over_the_model_limit(workdir):
    (workdir / "model" / "config.json").write_text('{"max_position_embeddings": 128}')
    message = error_of(workdir)
    assert "data.max_length: 256 is over the model's limit of 128 positions" in message
    (workdir / "model" / "config.json").write_text('{"text_config": {"max_position_embeddings": 512}}')
    assert load(workdir).data.max_length == 256


def test_bundled_model_name_needs_no_directory(workdir):
    cfg = load(workdir, ["model.path=smollm2-135m-instruct"])
    assert cfg.model.is_bundled


def test_bad_overrides_and_bad_yaml(workdir):
    with pytest.raises(ConfigError, match="expected key.path=value"):
        load(workdir, ["train.lr"])
    with pytest.raises(ConfigError, match="model.path is a value"):
        load(workdir, ["model.path.sub=1"])
    with pytest.raises(ConfigError, match="not an index"):
        load(workdir, ["data.sources.3.path=x"])
    with pytest.raises(ConfigError, match="duplicate key 'lr'"):
        load(workdir, text=BASE + "  lr: 3e-4\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load(workdir, text="- a\n- b\n")
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_config(workdir / "absent.yaml", [], SFTConfig)


def test_save_resolved_round_trips(workdir):
    cfg = load(workdir, ["train.precision=bf16_autocast", "lora.enabled=true"])
    path = save_resolved(cfg, workdir / "runs" / "demo" / "config.yaml")
    again = load_config(path, [], SFTConfig)
    assert again == cfg
    assert "lr: 0.0001" in path.read_text()


def test_config_hash_ignores_resume_only(workdir):
    cfg = load(workdir)
    (workdir / "ckpt").mkdir()
    assert C.config_hash(cfg) == C.config_hash(load(workdir, ["checkpoint.resume=ckpt"]))
    assert C.config_hash(cfg) != C.config_hash(load(workdir, ["train.lr=3e-4"]))


def test_grad_accum_from_tokens_per_step(workdir):
    train = load(workdir, ["train.tokens_per_step=4096", "train.micro_batch_size=2"]).train
    assert train.grad_accum_steps(max_length=1024) == 2
    assert train.grad_accum_steps(max_length=1024, world_size=2) == 1
    assert train.grad_accum_steps(max_length=4096, world_size=4) == 1  # never below one
    assert load(workdir).train.grad_accum_steps(max_length=256) == 1
    assert load(workdir, ["train.grad_accum=3"]).train.grad_accum_steps(256, 8) == 3


def test_lora_patterns():
    lora = C.LoraConfig(enabled=True, target_modules=["q_proj", "layers.0.*"], trainable_modules=["embed*"])
    assert lora.is_target("layers.3.attn.q_proj") and lora.is_target("layers.0.mlp.w1")
    assert not lora.is_target("layers.1.mlp.w1")
    assert lora.is_trainable("embed_tokens") and lora.scaling == 2.0


def test_assignment_is_validated(workdir):
    cfg = load(workdir)
    with pytest.raises(ValueError):
        cfg.train.lr = -1.0


def _sections(cls: type[BaseModel]) -> set[type[BaseModel]]:
    found = {cls}
    for field in cls.model_fields.values():
        for sub in C.loading._model_classes(field.annotation):
            found |= _sections(sub)
    return found


def test_every_section_rejects_unknown_keys():
    sections = _sections(SFTConfig)
    assert {C.TrainConfig, C.ModelConfig, C.LoraConfig, C.DataConfig, C.SourceConfig} <= sections
    for section in sections:
        assert section.model_config.get("extra") == "forbid", section.__name__
