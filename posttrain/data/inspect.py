"""`posttrain data inspect`: show rendered samples with their trained tokens, then summarise.

The whole configured data is streamed once in file order (no shuffle, one pass) through the
same pipeline the trainer uses, so the summary's counts and packing efficiency are what training
would see. Memory stays bounded by the pipeline's buffers, whatever the file size.
"""

from __future__ import annotations

import json
import sys
from typing import TextIO

from posttrain.config.data import DataConfig
from posttrain.data.batch import IGNORE_INDEX, Sample
from posttrain.data.loader import Pipeline

OPEN, CLOSE = "[[", "]]"  # trained-token markers when colours are off (piped output)


def trained_runs(sample: Sample) -> list[tuple[list[int], bool]]:
    """Consecutive tokens grouped by whether they are trained (predicted by the previous position)."""
    runs: list[tuple[list[int], bool]] = []
    for t, token in enumerate(sample.input_ids):
        trained = t > 0 and sample.labels[t - 1] != IGNORE_INDEX
        if runs and runs[-1][1] == trained:
            runs[-1][0].append(token)
        else:
            runs.append(([token], trained))
    return runs


def show_sample(sample: Sample, tokenizer, out: TextIO, *, color: bool, title: str) -> None:
    runs = [
        (tokenizer.decode(ids, skip_special_tokens=False), trained)
        for ids, trained in trained_runs(sample)
    ]
    header = f"--- {title}: {len(sample)} tokens, {sample.num_trained} trained ---"
    if color:
        from rich.console import Console
        from rich.text import Text

        text = Text()
        for piece, trained in runs:
            text.append(piece, style="bold black on green" if trained else "dim")
        console = Console(file=out, highlight=False, soft_wrap=True)
        console.print(header, style="bold")
        console.print(text)
    else:
        out.write(header + "\n")
        out.write("".join(f"{OPEN}{p}{CLOSE}" if trained else p for p, trained in runs) + "\n")


def inspect_data(
    cfg: DataConfig,
    tokenizer,
    *,
    n: int = 3,
    out: TextIO | None = None,
    color: bool | None = None,
) -> dict:
    """Print the first `n` rendered samples and a one-line JSON summary; return the summary."""
    out = out or sys.stdout
    if color is None:
        color = out.isatty()
    cfg = cfg.model_copy(update={"shuffle": False, "epochs": 1, "prefetch": 0})

    if n > 0:
        preview = Pipeline(cfg, tokenizer, batch_size=1)
        shown = 0
        while shown < n and (drawn := preview.mixer.next()) is not None:
            source, raw = drawn
            for unit in preview.render_row(source, raw):
                for sample in unit:
                    if shown < n:
                        title = f"{preview.source_names[source]} {raw.where}"
                        show_sample(sample, tokenizer, out, color=color, title=title)
                        shown += 1
        del preview  # closes its open file

    pipeline = Pipeline(cfg, tokenizer, batch_size=1)
    while True:
        try:
            pipeline.next_rows()
        except StopIteration:
            break
    c = pipeline.counters
    summary = {
        "samples": c.samples,
        "tokens": c.tokens,
        "trained_tokens": c.trained_tokens,
        "dropped": sum(c.dropped.values()) + c.skipped_errors,
        "truncated": c.truncated,
        "packing_efficiency": round(c.packing_efficiency, 4),
        "rows": c.rows,
        "dropped_by_reason": {**c.dropped, "errors": c.skipped_errors},
        "special_tokens": c.special_tokens,
        "expanded": c.expanded,
        "rows_read": c.rows_read,
    }
    out.write(json.dumps(summary) + "\n")
    out.flush()
    return summary
