"""Row readers for JSONL, JSON, Parquet and local Hugging Face `datasets` directories.

Every reader streams: it holds one line, one JSON value or one record batch at a time, never the
whole file. Rows come out as `RawRow`s that remember where they came from (`cursor`, an opaque
JSON-serialisable position, and `line`, a 1-based line for text files or a 0-based row index
otherwise), so a stream can be resumed and an error can name the exact place. JSONL lines are
decoded lazily (`RawRow.load`), so a malformed line fails where it is used, with its line number.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from posttrain.config.data import SourceConfig

Cursor = Any  # int or [int, int]: JSON-serialisable, reader-specific


class DataError(ValueError):
    """A bad input row: names the file, the line (or row) and the field."""

    def __init__(self, path: str, where: str, field: str | None, message: str):
        self.path, self.where, self.field, self.reason = path, where, field, message
        field_part = f" field '{field}':" if field else ""
        super().__init__(f"{path}:{where}:{field_part} {message}")


@dataclass
class RawRow:
    source: str  # path of the file or directory
    unit: str  # "line" (text files) or "row" (Parquet, datasets)
    line: int
    cursor: Cursor  # position of this row
    next_cursor: Cursor  # position right after it
    payload: Any  # bytes (a JSONL line) or an already decoded dict

    @property
    def where(self) -> str:
        return f"{self.unit} {self.line}"

    def error(self, field: str | None, message: str) -> DataError:
        return DataError(self.source, self.where, field, message)

    def load(self) -> dict:
        """The row as a dict; raises `DataError` for malformed JSON or a non-object value."""
        data = self.payload
        if isinstance(data, bytes):
            try:  # without the line break, an error at the end of the line keeps its column
                data = json.loads(data.rstrip(b"\r\n"))
            except UnicodeDecodeError as err:
                raise self.error(None, f"not valid UTF-8 ({err.reason})") from None
            except json.JSONDecodeError as err:
                raise self.error(None, f"malformed JSON at column {err.colno}: {err.msg}") from None
        if not isinstance(data, dict):
            raise self.error(None, f"expected a JSON object, got {type(data).__name__}")
        return data


class Reader:
    """Sequential access from a cursor, plus a bulk re-read used to restore shuffle buffers."""

    path: str

    def start(self) -> Cursor:
        raise NotImplementedError

    def iter_from(self, cursor: Cursor) -> Iterator[RawRow]:
        raise NotImplementedError

    def read_many(self, cursors: Sequence[Cursor]) -> list[RawRow]:
        """Rows at `cursors` (each the `cursor` of an earlier row), in the given order."""
        wanted = {_key(c) for c in cursors}
        found: dict[Any, RawRow] = {}
        for row in self.iter_from(self.start()):
            if _key(row.cursor) in wanted:
                found[_key(row.cursor)] = row
                if len(found) == len(wanted):
                    break
        return [found[_key(c)] for c in cursors]


def _key(cursor: Cursor) -> Any:
    return tuple(cursor) if isinstance(cursor, list) else cursor


class JsonlReader(Reader):
    """One JSON object per line; blank lines are skipped. Cursor: [byte offset, line number].

    A gzip-compressed file (`.jsonl.gz`) is read the same way; offsets are into the decompressed
    text, so a seek decompresses up to it (restoring a shuffle buffer reads the file once).
    """

    def __init__(self, path: str, compressed: bool = False):
        self.path, self.compressed = path, compressed

    def _open(self):
        return gzip.open(self.path, "rb") if self.compressed else open(self.path, "rb")

    def start(self) -> Cursor:
        return [0, 1]

    def iter_from(self, cursor: Cursor) -> Iterator[RawRow]:
        offset, line_no = cursor
        with self._open() as f:
            f.seek(offset)
            for line in f:
                here = [offset, line_no]
                offset += len(line)
                line_no += 1
                if line.strip():
                    yield RawRow(self.path, "line", here[1], here, [offset, line_no], line)

    def read_many(self, cursors: Sequence[Cursor]) -> list[RawRow]:
        if self.compressed:  # one sequential pass instead of a decompression per seek
            return super().read_many(cursors)
        rows = []
        with self._open() as f:
            for offset, line_no in cursors:
                f.seek(offset)
                line = f.readline()
                nxt = [offset + len(line), line_no + 1]
                rows.append(RawRow(self.path, "line", line_no, [offset, line_no], nxt, line))
        return rows


class RowRange(Reader):
    """The rows `start <= i < stop` (0-based, in file order) of another reader, keeping their
    original lines for messages. Cursor: [the inner reader's cursor, row index]."""

    def __init__(self, inner: Reader, start: int, stop: int | None):
        self.inner, self.first, self.stop = inner, start, stop
        self.path = inner.path

    def start(self) -> Cursor:
        return [self.inner.start(), 0]

    def iter_from(self, cursor: Cursor) -> Iterator[RawRow]:
        inner_cursor, index = cursor
        for row in self.inner.iter_from(inner_cursor):
            if self.stop is not None and index >= self.stop:
                return
            here, index = index, index + 1
            if here >= self.first:
                yield replace(row, cursor=[row.cursor, here], next_cursor=[row.next_cursor, index])

    def read_many(self, cursors: Sequence[Cursor]) -> list[RawRow]:
        rows = self.inner.read_many([c for c, _ in cursors])
        return [replace(row, cursor=[row.cursor, i], next_cursor=[row.next_cursor, i + 1])
                for row, (_, i) in zip(rows, cursors)]


class JsonArrayReader(Reader):
    """A top-level JSON array of objects, decoded one element at a time. Cursor: element index."""

    CHUNK = 1 << 20
    MAX_ELEMENT = 1 << 28  # an element that doesn't decode within 256 MiB is malformed

    def __init__(self, path: str):
        self.path = path

    def start(self) -> Cursor:
        return 0

    def iter_from(self, cursor: Cursor) -> Iterator[RawRow]:
        decoder = json.JSONDecoder()
        with open(self.path, encoding="utf-8") as f:
            buf, pos, line, index, eof = "", 0, 1, 0, False

            def more() -> bool:
                nonlocal buf, pos, eof
                chunk = f.read(self.CHUNK)
                if not chunk:
                    eof = True
                    return False
                buf = buf[pos:] + chunk
                pos = 0
                return True

            def skip_space() -> None:
                nonlocal pos, line
                while True:
                    while pos < len(buf) and buf[pos] in " \t\r\n":
                        line += buf[pos] == "\n"
                        pos += 1
                    if pos < len(buf) or not more():
                        return

            skip_space()
            if pos >= len(buf) or buf[pos] != "[":
                raise DataError(self.path, f"line {line}", None, "expected a top-level JSON array")
            pos += 1
            skip_space()
            if pos < len(buf) and buf[pos] == "]":
                return
            while True:
                skip_space()
                start_line = line
                while True:
                    try:
                        value, end = decoder.raw_decode(buf, pos)
                        break
                    except json.JSONDecodeError as err:
                        if eof or len(buf) - pos > self.MAX_ELEMENT or not more():
                            raise DataError(
                                self.path, f"line {start_line}", None, f"malformed JSON: {err.msg}"
                            ) from None
                line += buf.count("\n", pos, end)
                pos = end
                if index >= cursor:
                    yield RawRow(self.path, "line", start_line, index, index + 1, value)
                index += 1
                skip_space()
                if pos < len(buf) and buf[pos] == ",":
                    pos += 1
                    continue
                if pos < len(buf) and buf[pos] == "]":
                    return
                raise DataError(self.path, f"line {line}", None, "expected ',' or ']' in the array")


class ParquetReader(Reader):
    """Record batches of one Parquet file. Cursor: row index."""

    BATCH = 1024

    def __init__(self, path: str):
        import pyarrow.parquet as pq

        self.path = path
        self._meta = pq.ParquetFile(path).metadata
        self._group_starts = [0]
        for g in range(self._meta.num_row_groups):
            self._group_starts.append(self._group_starts[-1] + self._meta.row_group(g).num_rows)

    def start(self) -> Cursor:
        return 0

    def _group_of(self, index: int) -> int:
        import bisect

        return bisect.bisect_right(self._group_starts, index) - 1

    def iter_from(self, cursor: Cursor) -> Iterator[RawRow]:
        import pyarrow.parquet as pq

        if cursor >= self._group_starts[-1]:
            return
        first = self._group_of(cursor)
        index = self._group_starts[first]
        pf = pq.ParquetFile(self.path)
        groups = list(range(first, self._meta.num_row_groups))
        for batch in pf.iter_batches(batch_size=self.BATCH, row_groups=groups):
            for record in batch.to_pylist():
                if index >= cursor:
                    yield RawRow(self.path, "row", index, index, index + 1, record)
                index += 1

    def read_many(self, cursors: Sequence[Cursor]) -> list[RawRow]:
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(self.path)
        by_group: dict[int, list[int]] = {}
        for c in cursors:
            by_group.setdefault(self._group_of(c), []).append(c)
        found = {}
        for g, indices in by_group.items():
            table = pf.read_row_group(g)
            for i in indices:
                record = table.slice(i - self._group_starts[g], 1).to_pylist()[0]
                found[i] = RawRow(self.path, "row", i, i, i + 1, record)
        return [found[c] for c in cursors]


class HFDatasetReader(Reader):
    """A directory written by `datasets.Dataset(Dict).save_to_disk` (memory-mapped Arrow)."""

    BATCH = 1024

    def __init__(self, path: str, split: str | None):
        import datasets

        self.path = path
        loaded = datasets.load_from_disk(path)
        if isinstance(loaded, datasets.DatasetDict):
            splits = list(loaded)
            name = split or ("train" if "train" in loaded or len(splits) != 1 else splits[0])
            if name not in loaded:
                raise ValueError(f"{path}: no split {name!r}; it has {splits} (set the source's split)")
            loaded = loaded[name]
        elif split is not None:
            raise ValueError(f"{path}: split {split!r} given but the directory holds one Dataset")
        self._ds = loaded

    def start(self) -> Cursor:
        return 0

    def iter_from(self, cursor: Cursor) -> Iterator[RawRow]:
        n = len(self._ds)
        for lo in range(cursor, n, self.BATCH):
            columns = self._ds[lo : min(lo + self.BATCH, n)]
            keys = list(columns)
            for k in range(len(columns[keys[0]]) if keys else 0):
                i = lo + k
                yield RawRow(self.path, "row", i, i, i + 1, {key: columns[key][k] for key in keys})

    def read_many(self, cursors: Sequence[Cursor]) -> list[RawRow]:
        return [RawRow(self.path, "row", c, c, c + 1, self._ds[int(c)]) for c in cursors]


def detect_format(path: Path) -> str:
    if path.is_dir():
        return "hf"
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson") or "".join(path.suffixes[-2:]).lower() in (".jsonl.gz", ".ndjson.gz"):
        return "jsonl"
    if suffix == ".json":
        return "json"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    raise ValueError(
        f"{path}: cannot tell the format from the name; set the source's format "
        "(jsonl, json, parquet or hf)"
    )


def open_source(cfg: SourceConfig) -> Reader:
    """The reader for one configured source (limited to `cfg.rows` when set); fails early when
    the path is missing."""
    reader = _open_reader(cfg)
    return reader if cfg.rows is None else RowRange(reader, *cfg.rows)


def _open_reader(cfg: SourceConfig) -> Reader:
    path = Path(cfg.path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"data source {cfg.path!r} not found (relative to {Path.cwd()})")
    fmt = detect_format(path) if cfg.format == "auto" else cfg.format
    if fmt == "jsonl":
        return JsonlReader(str(path), compressed=path.suffix.lower() == ".gz")
    if fmt == "json":
        return JsonArrayReader(str(path))
    if fmt == "parquet":
        return ParquetReader(str(path))
    return HFDatasetReader(str(path), cfg.split)
