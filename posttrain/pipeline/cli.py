"""`posttrain pipeline CONFIG [key=value ...] [--plan] [--rerun NAME ...]`."""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "pipeline", help="run recipe stages (sft, dpo, distill, grpo, eval) in order, resumably",
        description="Run the stages of a pipeline config in order in one run directory; a rerun skips "
        "finished stages and resumes an interrupted one. Stages refer to earlier exports as "
        "${stages.<name>.export}.")
    parser.add_argument("config", help="pipeline YAML file")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of the pipeline file")
    parser.add_argument("--plan", action="store_true", help="print the resolved stages and exit")
    parser.add_argument("--rerun", action="append", default=[], metavar="NAME",
                        help="run this stage again from the start (repeatable)")
    parser.set_defaults(func=_run)


def _plan_table(decisions):
    from rich.table import Table

    from posttrain.pipeline.plan import substitute

    exports = {d.stage.name: str(d.stage.export) for d in decisions if d.stage.export is not None}
    table = Table(title="pipeline plan")
    for column in ("stage", "recipe", "action", "model", "data", "writes to"):
        table.add_column(column)
    for d in decisions:
        cfg = d.stage.cfg
        sources = cfg.sources if d.stage.recipe == "eval" else cfg.data.sources
        model = substitute(d.stage.raw["model"]["path"], exports)  # a reference shows the export it will read
        table.add_row(d.stage.name, d.stage.recipe, f"{d.action} ({d.why})", model,
                      ", ".join(s.path for s in sources), str(d.stage.run_dir))
    return table


def _summary_rows(state) -> dict[str, dict]:
    rows = {}
    for name, record in state.stages.items():
        row = {"recipe": record.get("recipe"), "status": record.get("status"), "seconds": record.get("seconds")}
        summary = record.get("summary") or {}
        row.update({k.removeprefix("score/"): v for k, v in summary.items()  # eval's score/correct = correct
                    if isinstance(v, (int, float)) and k != "seconds"})
        rows[name] = row
    return rows


def _run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from posttrain.evaluation.standalone import summary_table
    from posttrain.pipeline.runner import load_pipeline, run_pipeline

    console = Console(stderr=True, width=160)
    decisions, state = load_pipeline(args.config, args.overrides, args.rerun)
    console.print(_plan_table(decisions))
    if args.plan:
        return 0
    status = run_pipeline(decisions, state)
    console.print(summary_table(_summary_rows(state), f"pipeline {status}", "stage"))
    print(json.dumps({"status": status, "state": str(state.path)}))
    return 0
