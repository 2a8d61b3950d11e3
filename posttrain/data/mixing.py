"""Per-source streams (epochs, buffered shuffle) and the weighted mixer over them.

Both are deterministic functions of the seed and the data, and both snapshot into small
JSON-serialisable states: a stream stores its reader cursor, the *cursors* of the rows in its
shuffle buffer (re-read on restore) and its RNG; the mixer stores its RNG and the streams.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Sequence

from posttrain.data.sources import RawRow, Reader


def rng_state(rng: random.Random) -> list:
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def set_rng_state(rng: random.Random, state: list) -> None:
    rng.setstate((state[0], tuple(state[1]), state[2]))


class SourceStream:
    """One source as an endless sequence of passes; each pass shuffled through a bounded buffer.

    A pass ends when its last row is handed out (`completed` counts finished passes); the next
    call starts a new pass with a fresh order. Without shuffling the buffer holds one row.
    """

    def __init__(self, reader: Reader, *, index: int, seed: int, shuffle: bool, buffer_size: int):
        self.reader = reader
        self.index = index
        self.seed = seed
        self.shuffle = shuffle
        self.buffer_size = buffer_size if shuffle else 1
        self.completed = 0
        self.pass_rows: int | None = None  # rows in one pass, known once a pass completed
        self._cursor = reader.start()
        self._exhausted = False
        self._buffer: list[RawRow] = []
        self._iter = None
        self._rows_this_pass = 0
        self._rng = random.Random(self._pass_seed())

    def _pass_seed(self) -> str:
        return f"{self.seed}:{self.index}:{self.completed}"

    def next(self) -> RawRow:
        self._fill()
        if not self._buffer:
            raise ValueError(f"data source {self.reader.path} has no rows")
        if self.shuffle:
            j = self._rng.randrange(len(self._buffer))
            self._buffer[j], self._buffer[-1] = self._buffer[-1], self._buffer[j]
        row = self._buffer.pop()
        self._rows_this_pass += 1
        self._fill()
        if not self._buffer:  # that was the last row of this pass
            self.completed += 1
            self.pass_rows = self._rows_this_pass
            self._cursor, self._exhausted, self._iter = self.reader.start(), False, None
            self._rows_this_pass = 0
            self._rng = random.Random(self._pass_seed())
        return row

    def _fill(self) -> None:
        while len(self._buffer) < self.buffer_size and not self._exhausted:
            if self._iter is None:
                self._iter = self.reader.iter_from(self._cursor)
            row = next(self._iter, None)
            if row is None:
                self._exhausted, self._iter = True, None
                return
            self._cursor = row.next_cursor
            self._buffer.append(row)

    def snapshot(self) -> dict:
        return {
            "completed": self.completed,
            "cursor": self._cursor,
            "exhausted": self._exhausted,
            "buffer": [row.cursor for row in self._buffer],
            "rows_this_pass": self._rows_this_pass,
            "pass_rows": self.pass_rows,
            "rng": rng_state(self._rng),
        }

    def restore(self, state: dict) -> None:
        self.completed = state["completed"]
        self._cursor = state["cursor"]
        self._exhausted = state["exhausted"]
        self._iter = None
        self._buffer = self.reader.read_many(state["buffer"]) if state["buffer"] else []
        self._rows_this_pass = state["rows_this_pass"]
        self.pass_rows = state.get("pass_rows")
        set_rng_state(self._rng, state["rng"])


class Mixer:
    """Draws rows from streams with probability proportional to their weights.

    With `epochs` set, the mix ends once any source completes its last pass (the first source to
    run out ends the run, so no source is repeated beyond `epochs`); `None` never ends.
    """

    def __init__(self, streams: Sequence[SourceStream], weights: Sequence[float], *, seed: int,
                 epochs: int | None):
        assert len(streams) == len(weights) > 0
        self.streams = list(streams)
        self.epochs = epochs
        total = float(sum(weights))
        self._bounds = []
        acc = 0.0
        for w in weights:
            acc += w / total
            self._bounds.append(acc)
        self._rng = random.Random(f"mix:{seed}")
        self.done = False

    def next(self) -> tuple[int, RawRow] | None:
        """(source index, row), or None once the mix has ended."""
        if self.done:
            return None
        i = 0
        if len(self.streams) > 1:
            i = min(bisect.bisect_right(self._bounds, self._rng.random()), len(self.streams) - 1)
        stream = self.streams[i]
        row = stream.next()
        if self.epochs is not None and stream.completed >= self.epochs:
            self.done = True
        return i, row

    def snapshot(self) -> dict:
        return {
            "rng": rng_state(self._rng),
            "done": self.done,
            "streams": [s.snapshot() for s in self.streams],
        }

    def restore(self, state: dict) -> None:
        set_rng_state(self._rng, state["rng"])
        self.done = state["done"]
        if len(state["streams"]) != len(self.streams):
            raise ValueError(
                f"loader state has {len(state['streams'])} sources, the config {len(self.streams)}"
            )
        for stream, s in zip(self.streams, state["streams"]):
            stream.restore(s)
