"""`posttrain data inspect`: show rendered samples with their trained tokens, then summarise.

The whole configured data is streamed once in file order (no shuffle, one pass) through the
same pipeline the trainer uses, so the summary's counts and packing efficiency are what training
would see. Memory stays bounded by the pipeline's buffers, whatever the file size.
"""

from __future__ import annotations

import json
import re
import sys
from typing import TextIO

from posttrain.config.data import DataConfig
from posttrain.data.batch import IGNORE_INDEX, Sample
from posttrain.data.loader import Pipeline

OPEN, CLOSE = "[[", "]]"  # trained-token markers when colours are off (piped output)
ESC_OPEN, ESC_CLOSE = "\u00ab", "\u00bb"  # « » around control-token strings escaped as plain text
TRAINED_STYLE, CONTEXT_STYLE, ESCAPED_STYLE = "bold black on green", "dim", "underline magenta"

LEGEND_PLAIN = (
    f"legend: {OPEN}...{CLOSE} trained tokens (the loss is on them), the rest is context; "
    f"{ESC_OPEN}...{ESC_CLOSE} a control-token string found in the content and encoded as plain "
    "text (data.special_tokens: escape), not a control token"
)
LEGEND_COLOR = (
    "legend: green = trained tokens (the loss is on them), dim = context; underlined magenta = a "
    "control-token string found in the content and encoded as plain text (data.special_tokens: "
    "escape), not a control token"
)


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


def marked_pieces(sample: Sample, tokenizer, control_ids: set[int], control_re: re.Pattern | None
                  ) -> list[tuple[str, bool, bool]]:
    """`(text, trained, escaped)` pieces. A control-token string decoded from ordinary tokens can
    only be escaped content (a real control token is a single id in `control_ids`)."""
    pieces: list[tuple[str, bool, bool]] = []
    for ids, trained in trained_runs(sample):
        groups: list[tuple[list[int], bool]] = []
        for token in ids:
            control = token in control_ids
            if groups and groups[-1][1] == control:
                groups[-1][0].append(token)
            else:
                groups.append(([token], control))
        for group, control in groups:
            text = tokenizer.decode(group, skip_special_tokens=False)
            if control or control_re is None:
                pieces.append((text, trained, False))
                continue
            pos = 0
            for m in control_re.finditer(text):
                pieces += [(text[pos : m.start()], trained, False), (m.group(0), trained, True)]
                pos = m.end()
            pieces.append((text[pos:], trained, False))
    return [p for p in pieces if p[0]]


def show_sample(sample: Sample, tokenizer, out: TextIO, *, color: bool, title: str,
                control_ids: set[int] | None = None, control_re: re.Pattern | None = None) -> None:
    pieces = marked_pieces(sample, tokenizer, control_ids or set(), control_re)
    header = f"--- {title}: {len(sample)} tokens, {sample.num_trained} trained ---"
    if color:
        from rich.console import Console
        from rich.text import Text

        text = Text()
        for piece, trained, escaped in pieces:
            style = TRAINED_STYLE if trained else CONTEXT_STYLE
            text.append(piece, style=f"{style} {ESCAPED_STYLE}" if escaped else style)
        console = Console(file=out, highlight=False, soft_wrap=True)
        console.print(header, style="bold")
        console.print(text)
        return
    out.write(header + "\n")
    line, open_run = [], False
    for piece, trained, escaped in pieces:
        if trained != open_run:
            line.append(OPEN if trained else CLOSE)
            open_run = trained
        line.append(f"{ESC_OPEN}{piece}{ESC_CLOSE}" if escaped else piece)
    out.write("".join(line) + (CLOSE if open_run else "") + "\n")


def inspect_data(
    cfg: DataConfig,
    tokenizer,
    *,
    n: int = 3,
    out: TextIO | None = None,
    color: bool | None = None,
) -> dict:
    """Print the first `n` rendered samples and a one-line JSON summary; return the summary."""
    if cfg.task == "prompt":
        raise ValueError("data inspect shows training samples; prompt rows (data.task: prompt) become samples "
                         "only once the policy answers them (posttrain grpo logs each rollout's counts)")
    out = out or sys.stdout
    if color is None:
        color = out.isatty()
    cfg = cfg.model_copy(update={"shuffle": False, "epochs": 1, "prefetch": 0})

    if n > 0:
        preview = Pipeline(cfg, tokenizer, batch_size=1)
        controls = preview.renderer.control_strings  # longest first
        control_ids = {tokenizer.convert_tokens_to_ids(s) for s in controls}
        control_re = re.compile("|".join(map(re.escape, controls))) if controls else None
        out.write((LEGEND_COLOR if color else LEGEND_PLAIN) + "\n")
        shown = 0
        while shown < n and (drawn := preview.mixer.next()) is not None:
            source, raw = drawn
            for unit in preview.render_row(source, raw):
                for sample in unit:
                    if shown < n:
                        title = f"{preview.source_names[source]} {raw.where}"
                        show_sample(sample, tokenizer, out, color=color, title=title, control_ids=control_ids,
                                    control_re=control_re)
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
