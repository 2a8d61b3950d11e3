"""Running a pipeline: stages in order, `pipeline.json` kept true after every change.

For each stage the runner decides, before anything runs:

    skip     finished before with the same fingerprint and the same inputs (the checksums of the
             exports it was made from), and its export is complete (its SHA256SUMS as recorded)
    resume   started before with the same fingerprint and not finished: the recipe resumes from
             its newest checkpoint
    run      never started
    rerun    named with `--rerun`, or its inputs changed (an upstream stage was rerun and exported
             something else): its folder is removed and it runs from the start
    changed  its config changed since it ran, its folder exists without a record, or it finished
             but its export is missing or incomplete, and it was not named with `--rerun`: an
             error naming the stage, reported for every such stage before anything runs

A stage that stops (a signal) stops the pipeline; the next run resumes it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posttrain.config.loading import ConfigError, load_config, write_text_atomic
from posttrain.config.pipeline import PipelineConfig
from posttrain.pipeline.plan import PlannedStage, plan, resolved

STATE_FILE = "pipeline.json"
DONE = ("finished", "data_exhausted")  # a stage's statuses after which the pipeline goes on
SUMS_FILE = "SHA256SUMS"


def export_checksum(export: Path) -> str | None:
    """sha256 of the export's SHA256SUMS (written last, by an atomic rename): None when incomplete."""
    sums = export / SUMS_FILE
    return hashlib.sha256(sums.read_bytes()).hexdigest() if sums.is_file() else None


class PipelineState:
    """`pipeline.json`: per stage its status, fingerprint, inputs, timing, export and summary."""

    def __init__(self, path: Path):
        self.path = path
        self.stages: dict[str, dict[str, Any]] = {}
        if path.is_file():
            self.stages = json.loads(path.read_text())["stages"]

    def save(self) -> None:
        write_text_atomic(self.path, json.dumps({"stages": self.stages}, indent=2) + "\n")

    def update(self, name: str, **values: Any) -> None:
        self.stages.setdefault(name, {}).update(values)
        self.save()


@dataclass
class Decision:
    stage: PlannedStage
    action: str  # skip | resume | run | rerun | changed
    why: str


def _inputs(stage: PlannedStage, state: PipelineState) -> dict[str, str | None]:
    return {ref: state.stages.get(ref, {}).get("export_sha256") for ref in stage.refs}


def decide(stages: list[PlannedStage], state: PipelineState, rerun: set[str]) -> list[Decision]:
    decisions: list[Decision] = []
    runs: set[str] = set()  # stages that will (re)run: their downstream inputs are not known yet
    for stage in stages:
        record = state.stages.get(stage.name)
        upstream_runs = [r for r in stage.refs if r in runs]
        if stage.name in rerun:
            decision = Decision(stage, "rerun", "asked with --rerun")
        elif record is None and stage.run_dir.exists():
            decision = Decision(stage, "changed", f"its folder {stage.run_dir} exists but {STATE_FILE} has no "
                                "record of it")
        elif record is None:
            decision = Decision(stage, "run", "not run yet")
        elif record.get("fingerprint") != stage.fingerprint:
            decision = Decision(stage, "changed", "its config changed since it ran")
        elif upstream_runs or record.get("inputs") != _inputs(stage, state):
            decision = Decision(stage, "rerun", f"its input changed ({', '.join(upstream_runs or stage.refs)})")
        elif record.get("status") in DONE and _complete(stage, record):
            decision = Decision(stage, "skip", "finished")
        elif record.get("status") in DONE:
            what = stage.export or stage.run_dir / "summary.json"
            decision = Decision(stage, "changed", f"it finished, but its output {what} is missing or incomplete")
        else:
            decision = Decision(stage, "resume", f"{record.get('status')}: resumes from its newest checkpoint")
        if decision.action != "skip":
            runs.add(stage.name)
        decisions.append(decision)
    return decisions


def _complete(stage: PlannedStage, record: dict) -> bool:
    if stage.export is None:
        return (stage.run_dir / "summary.json").is_file()
    recorded = record.get("export_sha256")
    return recorded is not None and export_checksum(stage.export) == recorded


def load_pipeline(path: str | Path, overrides: list[str], rerun: list[str]) -> tuple[list[Decision], PipelineState]:
    """Plan every stage and decide what each does; every error of every stage is raised at once."""
    cfg = load_config(path, overrides, PipelineConfig)
    state = PipelineState(cfg.run_dir / STATE_FILE)
    exports = {n: Path(r["export"]) for n, r in state.stages.items() if r.get("export") and Path(r["export"]).is_dir()}
    stages = plan(cfg, Path(path).resolve().parent, exports)
    unknown = sorted(set(rerun) - {s.name for s in stages})
    if unknown:
        raise ConfigError(f"--rerun {', '.join(unknown)}: no such stage (stages: {', '.join(s.name for s in stages)})")
    decisions = decide(stages, state, set(rerun))
    changed = [d for d in decisions if d.action == "changed"]
    if changed:
        raise ConfigError("\n".join(f"stage {d.stage.name!r}: {d.why} ({state.path}); run it again from the "
                                    f"start with --rerun {d.stage.name}, or restore its config" for d in changed))
    return decisions, state


def run_stage(stage: PlannedStage, cfg: Any) -> dict[str, Any]:
    """Run one stage's recipe; returns what pipeline.json records about its outcome."""
    if stage.recipe == "eval":
        from posttrain.evaluation.standalone import run_eval

        return {"status": "finished", "summary": run_eval(cfg)}
    from posttrain.cluster.launch import launch
    from posttrain.recipes.cli import RECIPES

    result = launch(RECIPES[stage.recipe][2], cfg, cfg.launcher).main
    return {"status": result.status, "steps": result.steps, "summary": result.eval,
            "final_loss": result.losses[-1] if result.losses else None}


def run_pipeline(decisions: list[Decision], state: PipelineState) -> str:
    """Run the decided stages in order; "finished", or the status of the stage that ended it."""
    for decision in decisions:
        stage = decision.stage
        if decision.action == "skip":
            continue
        if decision.action == "rerun" and stage.run_dir.exists():
            shutil.rmtree(stage.run_dir)
        exports = {n: Path(r["export"]) for n, r in state.stages.items() if r.get("export")}
        cfg = resolved(stage, exports)
        state.update(stage.name, recipe=stage.recipe, status="running", fingerprint=stage.fingerprint,
                     inputs=_inputs(stage, state), run_dir=str(stage.run_dir), started=time.time())
        started = time.perf_counter()
        outcome = run_stage(stage, cfg)
        export = stage.export if stage.export is not None and export_checksum(stage.export) else None
        state.update(stage.name, **outcome, seconds=round(time.perf_counter() - started, 1),
                     export=str(export) if export else None,
                     export_sha256=export_checksum(export) if export else None)
        if outcome["status"] not in DONE:
            return outcome["status"]
    return "finished"
