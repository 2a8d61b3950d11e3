"""Resolving a pipeline: each stage's config read, overridden, its references to earlier stages'
exports checked and substituted, and validated by its recipe's config class, every stage before
the first one runs.

A stage refers to an earlier training stage's exported model as `${stages.<name>.export}` (any
string value of its config). Until that export exists, the reference stands for the model the
referenced stage starts from (the same architecture and tokenizer), so every stage validates at
plan time. A stage's fingerprint hashes its config with the references left as written; what it
was trained from is recorded separately (the upstream exports' checksums, see `runner.py`).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posttrain.config.base import Section
from posttrain.config.loading import ConfigError, apply_overrides, read_yaml, validate_config
from posttrain.config.pipeline import PipelineConfig, StageConfig

REFERENCE = re.compile(r"\$\{stages\.([^}]*)\.export\}")

CONFIG_CLASSES = {
    "sft": "posttrain.config:SFTConfig",
    "dpo": "posttrain.config.dpo:DPOConfig",
    "distill": "posttrain.config.distill:DistillConfig",
    "grpo": "posttrain.config.grpo:GRPOConfig",
    "eval": "posttrain.config.evaluate:EvaluateConfig",
}
EXPORT_DIR = "export"


def config_class(recipe: str) -> type[Section]:
    module, name = CONFIG_CLASSES[recipe].split(":")
    return getattr(importlib.import_module(module), name)


@dataclass
class PlannedStage:
    name: str
    recipe: str
    raw: dict[str, Any]  # the stage's config after overrides, references as written
    refs: list[str]  # the stages it refers to, in order of first use
    cfg: Any  # validated, references resolved (stand-ins until the exports exist)
    fingerprint: str

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.run_dir)

    @property
    def export(self) -> Path | None:
        """Where a training stage's model lands (an eval stage exports none)."""
        return None if self.recipe == "eval" else self.run_dir / EXPORT_DIR

    @property
    def model_path(self) -> str:
        return self.cfg.model.path


def references(value: Any) -> list[str]:
    """The stage names referred to anywhere in a config value, in order, without repeats."""
    if isinstance(value, str):
        return REFERENCE.findall(value)
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else []
    return list(dict.fromkeys(name for item in items for name in references(item)))


def substitute(value: Any, paths: dict[str, str]) -> Any:
    if isinstance(value, str):
        return REFERENCE.sub(lambda m: paths[m.group(1)], value)
    if isinstance(value, dict):
        return {k: substitute(v, paths) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute(v, paths) for v in value]
    return value


def stage_dict(stage: StageConfig, base_dir: Path, run_root: Path) -> dict[str, Any]:
    """The stage's config mapping: file or inline, overrides applied, placed in the pipeline's run
    directory; training stages resume from their newest checkpoint."""
    if isinstance(stage.config, str):
        path = Path(stage.config).expanduser()
        data, _ = read_yaml(path if path.is_absolute() else base_dir / path)
    else:
        data = dict(stage.config)
    data = apply_overrides(data, stage.overrides)
    data["output_dir"], data["name"] = str(run_root), stage.name
    if stage.recipe != "eval":
        data = apply_overrides(data, ["checkpoint.resume=auto"])
    return data


def fingerprint(recipe: str, raw: dict[str, Any]) -> str:
    text = json.dumps({"recipe": recipe, "config": raw}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _check_refs(stage: StageConfig, refs: list[str], planned: dict[str, PlannedStage], order: list[str],
                failed: set[str]) -> None:
    for ref in refs:
        if ref in failed:
            raise ConfigError(f"${{stages.{ref}.export}}: stage {ref!r} has errors (above)")
        if ref in planned:
            if planned[ref].recipe == "eval":
                raise ConfigError(f"${{stages.{ref}.export}}: stage {ref!r} is an eval stage and exports no model")
            continue
        if ref == stage.name or ref in order:
            raise ConfigError(f"${{stages.{ref}.export}}: a stage can only use the exports of stages before it "
                              f"({ref!r} {'is this stage' if ref == stage.name else 'comes later'}: a cycle)")
        raise ConfigError(f"${{stages.{ref}.export}}: there is no stage named {ref!r} "
                          f"(stages: {', '.join(order)})")


def plan(pipeline: PipelineConfig, base_dir: Path, exports: dict[str, Path] | None = None) -> list[PlannedStage]:
    """Every stage resolved and validated; `exports` are finished stages' export directories (used
    instead of stand-ins). All stages' errors are gathered into one `ConfigError`."""
    exports = exports or {}
    order = [s.name for s in pipeline.stages]
    planned: dict[str, PlannedStage] = {}
    errors: list[str] = []
    failed: set[str] = set()
    for stage in pipeline.stages:
        try:
            raw = stage_dict(stage, base_dir, pipeline.run_dir)
            refs = references(raw)
            _check_refs(stage, refs, planned, order, failed)
            paths = {r: str(exports[r]) if r in exports else planned[r].model_path for r in refs}
            cfg = validate_config(substitute(raw, paths), config_class(stage.recipe), source=f"stage {stage.name!r}")
            planned[stage.name] = PlannedStage(stage.name, stage.recipe, raw, refs, cfg, fingerprint(stage.recipe, raw))
        except (ConfigError, ValueError, FileNotFoundError) as err:
            failed.add(stage.name)
            errors.append(f"stage {stage.name!r} ({stage.recipe}): {err}")
    if errors:
        raise ConfigError("the pipeline has errors; nothing ran:\n" + "\n".join(errors))
    return list(planned.values())


def resolved(stage: PlannedStage, exports: dict[str, Path]) -> Any:
    """The stage's config with its references pointing at the real exports (all must exist)."""
    missing = [r for r in stage.refs if not (exports.get(r) and Path(exports[r]).is_dir())]
    if missing:
        raise ConfigError(f"stage {stage.name!r} needs the export of {', '.join(missing)}, which is missing")
    paths = {r: str(exports[r]) for r in stage.refs}
    return validate_config(substitute(stage.raw, paths), config_class(stage.recipe), source=f"stage {stage.name!r}")
