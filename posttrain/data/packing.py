"""On-the-fly packing of samples into fixed-length rows.

`BestFitPacker` packs best-fit-decreasing over a bounded window: units gather until they hold
`window_rows` rows' worth of tokens, then they are placed largest first, each into the row it
fills most tightly (a new row when none has room). The rows are emitted in a seeded shuffled
order, except the least-full quarter: their units go back to wait for the next round, where new
arrivals can fill the gaps. A unit is carried back at most `MAX_CARRY` times, so none waits
forever, and the buffer never holds much more than `1.25 * window_rows` rows of tokens.

A unit is one sample, or a preference pair that must share a row; units are never split across
rows. `PadPacker` is the `packing: false` baseline: every unit is its own row.
"""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass, field

from posttrain.data.batch import Sample

Row = list[Sample]


def unit_length(unit: list[Sample]) -> int:
    return sum(len(s) for s in unit)


@dataclass
class _Pending:
    carried: int  # rounds this unit has already waited
    arrival: int  # arrival number: a deterministic tie-break
    unit: list[Sample]
    length: int = 0

    def __post_init__(self) -> None:
        self.length = unit_length(self.unit)


@dataclass
class _Bin:
    used: int = 0
    entries: list[_Pending] = field(default_factory=list)


class BestFitPacker:
    CARRY_FRACTION = 0.25
    MAX_CARRY = 4

    def __init__(self, capacity: int, window_rows: int, seed: int = 0):
        assert capacity > 0 and window_rows > 0
        self.capacity = capacity
        self.window_rows = window_rows
        self.seed = seed
        self._pending: list[_Pending] = []
        self._pending_tokens = 0
        self._arrivals = 0
        self._rounds = 0

    def add(self, unit: list[Sample]) -> list[Row]:
        """Take `unit`; return the rows this completed (possibly none)."""
        entry = _Pending(0, self._arrivals, unit)
        assert 0 < entry.length <= self.capacity, (
            f"unit of {entry.length} tokens does not fit a row of {self.capacity}"
        )
        self._arrivals += 1
        self._pending.append(entry)
        self._pending_tokens += entry.length
        if self._pending_tokens >= self.capacity * self.window_rows:
            return self._round(final=False)
        return []

    def flush(self) -> list[Row]:
        """Pack and emit everything still waiting (end of data)."""
        return self._round(final=True) if self._pending else []

    def _round(self, final: bool) -> list[Row]:
        bins = self._best_fit_decreasing(self._pending)
        carry: set[int] = set()
        if not final:
            least_full = sorted(range(len(bins)), key=lambda i: (bins[i].used, i))
            for i in least_full[: int(len(bins) * self.CARRY_FRACTION)]:
                if all(e.carried < self.MAX_CARRY for e in bins[i].entries):
                    carry.add(i)
        self._pending = [
            _Pending(e.carried + 1, e.arrival, e.unit) for i in sorted(carry) for e in bins[i].entries
        ]
        self._pending_tokens = sum(e.length for e in self._pending)
        rows = [[s for e in b.entries for s in e.unit] for i, b in enumerate(bins) if i not in carry]
        # Largest documents open the first rows; shuffle so batches and ranks don't see that order.
        random.Random(f"pack:{self.seed}:{self._rounds}").shuffle(rows)
        self._rounds += 1
        return rows

    def _best_fit_decreasing(self, entries: list[_Pending]) -> list[_Bin]:
        bins: list[_Bin] = []
        gaps: list[tuple[int, int]] = []  # (free tokens, bin index), sorted
        for entry in sorted(entries, key=lambda e: (-e.length, e.arrival)):
            k = bisect.bisect_left(gaps, (entry.length, -1))
            if k < len(gaps):
                _, i = gaps.pop(k)
            else:
                i = len(bins)
                bins.append(_Bin())
            b = bins[i]
            b.used += entry.length
            b.entries.append(entry)
            if b.used < self.capacity:
                bisect.insort(gaps, (self.capacity - b.used, i))
        return bins

    def snapshot(self) -> dict:
        return {
            "pending": [(e.carried, e.arrival, e.unit) for e in self._pending],
            "arrivals": self._arrivals,
            "rounds": self._rounds,
        }

    def restore(self, state: dict) -> None:
        self._pending = [_Pending(c, a, list(unit)) for c, a, unit in state["pending"]]
        self._pending_tokens = sum(e.length for e in self._pending)
        self._arrivals = state["arrivals"]
        self._rounds = state["rounds"]


class PadPacker:
    """One unit per row (`packing: false`); rows are padded when batched."""

    def __init__(self, capacity: int):
        self.capacity = capacity

    def add(self, unit: list[Sample]) -> list[Row]:
        return [list(unit)]

    def flush(self) -> list[Row]:
        return []

    def snapshot(self) -> dict:
        return {"pending": [], "arrivals": 0, "rounds": 0}

    def restore(self, state: dict) -> None:
        assert not state["pending"]


def packing_efficiency(rows: list[Row], capacity: int) -> float:
    """Real tokens over row slots."""
    return sum(unit_length(r) for r in rows) / (len(rows) * capacity) if rows else 0.0
