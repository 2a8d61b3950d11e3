"""On-the-fly packing of samples into fixed-length rows.

`BestFitPacker` keeps at most `open_rows` partially filled rows and a pool of pending units (the
bounded packing buffer). A unit goes to the open row it fills most tightly (best fit); a row that
becomes exactly full is closed at once. When nothing fits and all rows are open, the fullest row is
closed to make room. A unit is one sample, or a preference pair that must share a row; units are
never split across rows.

`PadPacker` is the `packing: false` baseline: every unit is its own row.
"""

from __future__ import annotations

import bisect

from posttrain.data.batch import Sample

Row = list[Sample]


def unit_length(unit: list[Sample]) -> int:
    return sum(len(s) for s in unit)


class BestFitPacker:
    """Best fit over a bounded window: `open_rows` open rows plus `4 * open_rows` pending units.

    Arriving units wait in a pending pool; when it overflows, the largest pending unit is placed
    (largest first, as in offline best-fit-decreasing). Before a row is closed to make room, its
    gap is topped up with the largest pending units that still fit.
    """

    POOL_PER_ROW = 4

    def __init__(self, capacity: int, open_rows: int):
        assert capacity > 0 and open_rows > 0
        self.capacity = capacity
        self.open_rows = open_rows
        self.pool_size = self.POOL_PER_ROW * open_rows
        self._rows: list[Row] = []
        self._used: list[int] = []
        # Pending units sorted by (length, -arrival): the last is the largest, oldest first on ties.
        self._pool: list[tuple[int, int, list[Sample]]] = []
        self._arrivals = 0

    def add(self, unit: list[Sample]) -> list[Row]:
        """Take `unit`; return the rows this closed (in closing order)."""
        n = unit_length(unit)
        assert 0 < n <= self.capacity, f"unit of {n} tokens does not fit a row of {self.capacity}"
        bisect.insort(self._pool, (n, -self._arrivals, unit), key=_pool_key)
        self._arrivals += 1
        closed: list[Row] = []
        while len(self._pool) > self.pool_size:
            self._place(self._pool.pop(), closed)
        return closed

    def flush(self) -> list[Row]:
        """Place every pending unit, then close every row (end of data)."""
        closed: list[Row] = []
        while self._pool:
            self._place(self._pool.pop(), closed)
        closed += self._rows
        self._rows, self._used = [], []
        return closed

    def _place(self, entry: tuple[int, int, list[Sample]], closed: list[Row]) -> None:
        n, _, unit = entry
        best, best_left = -1, self.capacity + 1
        for i, used in enumerate(self._used):
            left = self.capacity - used - n
            if 0 <= left < best_left:
                best, best_left = i, left
        if best >= 0:
            self._rows[best].extend(unit)
            self._used[best] += n
            if best_left == 0:
                closed.append(self._close(best))
            return
        if len(self._rows) >= self.open_rows:
            fullest = max(range(len(self._used)), key=lambda i: (self._used[i], -i))
            closed.append(self._close(fullest, top_up=True))
        self._rows.append(list(unit))
        self._used.append(n)

    def _close(self, i: int, top_up: bool = False) -> Row:
        while top_up and self._pool:
            gap = self.capacity - self._used[i]
            k = bisect.bisect_right(self._pool, (gap, 0), key=_pool_key) - 1
            if k < 0:
                break
            n, _, unit = self._pool.pop(k)
            self._rows[i].extend(unit)
            self._used[i] += n
        self._used.pop(i)
        return self._rows.pop(i)

    def snapshot(self) -> dict:
        return {
            "rows": [list(row) for row in self._rows],
            "pool": [(arrival, unit) for _, arrival, unit in self._pool],
            "arrivals": self._arrivals,
        }

    def restore(self, state: dict) -> None:
        self._rows = [list(row) for row in state["rows"]]
        self._used = [unit_length(row) for row in self._rows]
        self._pool = [(unit_length(unit), arrival, list(unit)) for arrival, unit in state["pool"]]
        self._pool.sort(key=_pool_key)
        self._arrivals = state["arrivals"]


def _pool_key(entry: tuple) -> tuple[int, int]:
    return entry[0], entry[1]


class PadPacker:
    """One unit per row (`packing: false`); rows are padded when batched."""

    def __init__(self, capacity: int):
        self.capacity = capacity

    def add(self, unit: list[Sample]) -> list[Row]:
        return [list(unit)]

    def flush(self) -> list[Row]:
        return []

    def snapshot(self) -> dict:
        return {"rows": [], "pool": [], "arrivals": 0}

    def restore(self, state: dict) -> None:
        assert not state["rows"] and not state["pool"]


def packing_efficiency(rows: list[Row], capacity: int) -> float:
    """Real tokens over row slots."""
    return sum(unit_length(r) for r in rows) / (len(rows) * capacity) if rows else 0.0
