"""Console output: a rich progress bar on a terminal, one plain line per log call otherwise."""

from __future__ import annotations

import time
from collections.abc import Mapping

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

# Per-step metrics shown beside the bar, in this order, with their labels and formats.
SHOWN: tuple[tuple[str, str, str], ...] = (
    ("loss", "loss", "{:.4f}"),
    ("lr", "lr", "{:.2e}"),
    ("grad_norm", "gnorm", "{:.3f}"),
    ("tokens_per_s", "tok/s", "{:,.0f}"),
    ("trained_tokens_per_s", "trained tok/s", "{:,.0f}"),
    ("mfu", "mfu", "{:.1%}"),
    ("reward/mean", "reward", "{:.3f}"),
)


def format_value(value: float) -> str:
    if isinstance(value, int) or (abs(value) >= 1e3 and float(value).is_integer()):
        return f"{int(value):,}"
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
        return f"{value:.3e}"
    return f"{value:.4f}"


def format_stats(metrics: Mapping[str, float]) -> str:
    parts = [f"{label} {fmt.format(metrics[key])}" for key, label, fmt in SHOWN if key in metrics]
    return " | ".join(parts)


def _format_eta(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


class ConsoleSink:
    """Progress to the console: step/total, elapsed, ETA, loss, lr, tokens/s, MFU.

    Metrics whose name holds a `/` (e.g. `eval/loss`) logged on their own are printed as a line
    of their own, since they come at their own cadence; logged with a step's metrics (the data
    counters `data/dropped`, ...) they join the step's line when non-zero. Without a terminal
    (CI logs, files), every step prints exactly one unwrapped line with a simple ETA instead of
    redrawing a bar.
    """

    def __init__(
        self,
        total_steps: int | None,
        start_step: int = 0,
        console: Console | None = None,
        description: str = "train",
    ):
        self.console = console or Console()
        self.total_steps = total_steps
        self.start_step = start_step
        self._t0 = time.perf_counter()
        self.progress: Progress | None = None
        if self.console.is_terminal:
            self.progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[stats]}"),
                console=self.console,
            )
            self.task = self.progress.add_task(
                description, total=total_steps, completed=start_step, stats=""
            )
            self.progress.start()

    def _eta(self, step: int) -> str | None:
        done = step - self.start_step
        if self.total_steps is None or done <= 0:
            return None
        per_step = (time.perf_counter() - self._t0) / done
        return _format_eta(per_step * max(0, self.total_steps - step))

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        grouped = {k: v for k, v in metrics.items() if "/" in k}
        stats = format_stats(metrics)
        if not stats:  # an evaluation (or other periodic) call: a line of its own, the bar stays
            if grouped:
                line = " | ".join(f"{k} {format_value(v)}" for k, v in grouped.items())
                self.console.print(f"step {step}: {line}", highlight=False, soft_wrap=True)
            return
        # Grouped metrics logged with the step join its line; data counters (data/dropped, ...)
        # only when non-zero, an objective's own metrics (rewards/margins, ...) always.
        counters = " | ".join(f"{k} {format_value(v)}" for k, v in grouped.items()
                              if v or not k.startswith("data/"))
        stats = " | ".join(part for part in (stats, counters) if part)
        if self.progress is not None:
            self.progress.update(self.task, completed=step, stats=stats)
            return
        total = f"/{self.total_steps}" if self.total_steps is not None else ""
        eta = self._eta(step)
        line = f"step {step}{total} | {stats}" + (f" | eta {eta}" if eta else "")
        self.console.print(line, highlight=False, soft_wrap=True)  # one line per step, never wrapped

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
