"""Rows that give nothing to train on: each skipped row logged once, limits that fail the run.

* A malformed row under `data.on_error: skip` is logged (file, line, field, reason) the first
  time it is skipped in the process, and counted; once `data.max_skipped_fraction` of the rows read so far
  were skipped (checked from `MIN_ROWS` rows on, and at the end of the data) the run fails.
* A stream that has drawn a whole pass of every source without keeping one sample (all rows
  skipped, too long, or without a trained token) can never produce a batch: an error, not an
  endless loop (`data.epochs: null` repeats the data forever).
* `empty_data_message` says why a run got no batch at all.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from posttrain.data.sources import DataError

logger = logging.getLogger("posttrain.data")

MIN_ROWS = 100  # the skipped share is judged from this many rows on (and at the end of the data)
MAX_LOGGED = 1000  # distinct skipped rows logged; later ones are counted only

# Rows already logged in this process: a row is logged once however many pipelines read it (the
# step-counting pass, a reference pass, training, every epoch).
_LOGGED: set[tuple[str, str]] = set()


class DataQualityError(ValueError):
    """The data as a whole cannot train the model (too many bad rows, nothing usable)."""


def counters_summary(counters: Any) -> str:
    dropped = ", ".join(f"{k} {v}" for k, v in counters.dropped.items())
    return (f"{counters.rows_read} rows read, {counters.samples} samples kept, skipped as malformed "
            f"{counters.skipped_errors}, dropped: {dropped}")


def empty_data_message(counters: Any) -> str:
    return (f"the data gave nothing to train on ({counters_summary(counters)}); check the rows "
            "(posttrain data inspect shows what each becomes), data.max_length and data.on_error")


class SkipWatch:
    """Per pipeline: logs skipped rows and enforces the limits above."""

    def __init__(self, max_fraction: float, *, log: bool):
        self.max_fraction = max_fraction
        self.log = log
        self.first_error: str | None = None
        self.rows_since_kept = 0
        self._logged = _LOGGED

    def skipped(self, error: DataError) -> None:
        if self.first_error is None:
            self.first_error = str(error)
        key = (error.path, error.where)
        if not self.log or key in self._logged:
            return
        if len(self._logged) < MAX_LOGGED:
            self._logged.add(key)
            logger.warning("skipped %s (data.on_error: skip)", error)
        elif len(self._logged) == MAX_LOGGED:
            self._logged.add(("", ""))
            logger.warning("more than %d rows skipped; further ones are counted, not logged", MAX_LOGGED)

    def after_chunk(self, drawn: int, kept: int, streams: Sequence[Any], counters: Any, *, ended: bool) -> None:
        """Called after each rendered chunk of `drawn` rows of which `kept` units were kept."""
        self.rows_since_kept = 0 if kept else self.rows_since_kept + drawn
        self._check_fraction(counters, ended=ended)
        pass_rows = [getattr(s, "pass_rows", None) for s in streams]
        if None in pass_rows or ended:
            return
        if self.rows_since_kept >= sum(pass_rows) + drawn:
            names = ", ".join(str(s.reader.path) for s in streams)
            raise DataQualityError(
                f"a whole pass over the data ({names}) gave no usable sample, so no batch can ever "
                f"be made ({counters_summary(counters)})"
                + (f"; the first skipped row: {self.first_error}" if self.first_error else "")
            )

    def _check_fraction(self, counters: Any, *, ended: bool) -> None:
        read, skipped = counters.rows_read, counters.skipped_errors
        if not skipped or (read < MIN_ROWS and not ended):
            return
        if skipped > self.max_fraction * read:
            raise DataQualityError(
                f"{skipped} of {read} rows read ({skipped / read:.0%}) were malformed and skipped "
                f"(data.on_error: skip), more than data.max_skipped_fraction ({self.max_fraction:g}); "
                f"the first: {self.first_error}. Fix the rows or raise the limit"
            )
