"""The data loader: sources -> mixer -> render -> filter -> pack -> rank's batch, resumable.

`Pipeline` is the synchronous, single-threaded chain; every step is deterministic, so its
`snapshot()` after a batch is the exact position to resume from. `DataLoader` runs a pipeline in
a background thread that prepares `prefetch` batches ahead and hands each batch over together with
the snapshot taken right after it, so `state_dict()` describes the batches actually consumed,
never the ones waiting in the queue.

Ranks (`shard`):
- `rows` (default): every rank reads, renders and packs the same global stream and takes rows
  `[rank * B, (rank + 1) * B)` of each global batch of `B * world_size` rows. Ranks get disjoint
  data and the same number of batches by construction; the last global batch is completed with
  empty rows (all padding, no trained token) so no rank waits for a batch that never comes.
- `samples`: each rank renders only every `world_size`-th drawn row and packs alone; cheaper at
  large world sizes, batch counts differ, so the stream must be endless (`epochs: null`).
"""

from __future__ import annotations

import copy
import queue
import threading
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from posttrain.config.data import DataConfig
from posttrain.data.batch import PackedBatch, Sample, collate, samples_from_dicts, samples_to_dicts
from posttrain.data.chat import ChatRenderer, Rendered
from posttrain.data.mixing import Mixer, SourceStream
from posttrain.data.packing import BestFitPacker, PadPacker, Row, unit_length
from posttrain.data.pairs import pair_id, prompt_mismatch, source_key
from posttrain.data.rows import FieldError, parse_row
from posttrain.data.skips import SkipWatch
from posttrain.data.sources import DataError, RawRow, open_source

STATE_VERSION = 1
RENDER_CHUNK = 64  # rows rendered and tokenized together (one batched tokenizer call)


@dataclass
class DataCounters:
    """What the data did so far (up to the last consumed batch), for logs and `data inspect`.

    Sample-level counts cover the stream this rank processed (the global stream with
    `shard: rows`); `rows`, `row_tokens` and `row_slots` cover packed rows of the global batches.
    """

    rows_read: int = 0
    samples: int = 0  # documents packed
    tokens: int = 0
    trained_tokens: int = 0
    truncated: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: {"overlong": 0, "no_trained_tokens": 0})
    skipped_errors: int = 0
    special_tokens: int = 0  # rows whose content held special-token strings (escaped or allowed)
    expanded: int = 0  # conversations expanded into one sample per turn
    rows: int = 0  # packed rows handed out (padding-only rows excluded)
    row_tokens: int = 0
    row_slots: int = 0  # token slots of those rows (max_length each, or the padded length)
    padding_rows: int = 0  # empty rows that complete the last global batch

    @property
    def packing_efficiency(self) -> float:
        return self.row_tokens / self.row_slots if self.row_slots else 0.0

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["dropped"] = dict(self.dropped)
        out["packing_efficiency"] = round(self.packing_efficiency, 6)
        return out

    def copy(self) -> DataCounters:
        return DataCounters(**{**asdict(self), "dropped": dict(self.dropped)})


class Pipeline:
    """Synchronous, stateful data pipeline for one rank."""

    def __init__(
        self,
        cfg: DataConfig,
        tokenizer,
        *,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        max_length: int | None = None,
    ):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of size {world_size}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.cfg = cfg
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.max_length = max_length or cfg.max_length
        data_seed = cfg.seed if cfg.seed is not None else seed
        self.source_names = [s.name or Path(s.path).name for s in cfg.sources]
        self.source_keys = [source_key(s) for s in cfg.sources]
        streams = [
            SourceStream(open_source(s), index=i, seed=data_seed, shuffle=cfg.shuffle,
                         buffer_size=cfg.shuffle_buffer)
            for i, s in enumerate(cfg.sources)
        ]
        self.mixer = Mixer(streams, [s.weight for s in cfg.sources], seed=data_seed, epochs=cfg.epochs)
        self.renderer = ChatRenderer(
            tokenizer,
            train_on=cfg.train_on,
            special_tokens=cfg.special_tokens,
            template_rewrite=cfg.template_rewrite,
        )
        self.packer = (
            BestFitPacker(self.max_length, cfg.pack_rows, seed=data_seed)
            if cfg.packing
            else PadPacker(self.max_length)
        )
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (tokenizer.eos_token_id or 0)
        self.counters = DataCounters()
        self.skips = SkipWatch(cfg.max_skipped_fraction, log=cfg.shard == "samples" or rank == 0)
        self._ready: list[Row] = []
        self._drawn = 0
        self._finished = False

    # ---- producing ---------------------------------------------------------------------------

    def next_rows(self) -> list[Row]:
        """This rank's rows of the next batch; raises StopIteration at the end of the data."""
        per_step = self.batch_size * (self.world_size if self.cfg.shard == "rows" else 1)
        while len(self._ready) < per_step and not self._finished:
            chunk, ended = [], False
            while len(chunk) < RENDER_CHUNK:
                drawn = self.mixer.next()
                if drawn is None:
                    ended = True
                    break
                self._drawn += 1
                if self.cfg.shard == "samples" and (self._drawn - 1) % self.world_size != self.rank:
                    continue
                chunk.append(drawn)
            units = self.render_rows(chunk)
            for unit in units:
                self._ready += self.packer.add(unit)
            self.skips.after_chunk(len(chunk), len(units), self.mixer.streams, self.counters, ended=ended)
            if ended:
                self._ready += self.packer.flush()
                self._finished = True
        if not self._ready:
            raise StopIteration
        rows, self._ready = self._ready[:per_step], self._ready[per_step:]
        self.counters.padding_rows += per_step - len(rows)
        rows += [[] for _ in range(per_step - len(rows))]
        groups = [rows[i : i + self.batch_size] for i in range(0, per_step, self.batch_size)]
        for group in groups:
            length = self._row_length(group)
            for row in group:
                if row:
                    self.counters.rows += 1
                    self.counters.row_tokens += unit_length(row)
                    self.counters.row_slots += length
        return groups[self.rank] if self.cfg.shard == "rows" else groups[0]

    def next_batch(self) -> PackedBatch:
        rows = self.next_rows()
        return collate(rows, self._row_length(rows), self.pad_id)

    def _row_length(self, rows: list[Row]) -> int:
        if self.cfg.packing:
            return self.max_length
        return max([unit_length(r) for r in rows] + [1])

    def render_row(self, source: int, raw: RawRow) -> list[list[Sample]]:
        return self.render_rows([(source, raw)])

    def render_rows(self, drawn: list[tuple[int, RawRow]]) -> list[list[Sample]]:
        """Render drawn rows into packable units (tokenized in one batch), applying the
        `on_error` policy, the length rule and the no-trained-token rule; counted."""
        prepared, origins = [], []
        for source, raw in drawn:
            self.counters.rows_read += 1
            try:
                example = parse_row(raw.load(), self.cfg.sources[source], task=self.cfg.task,
                                    chat_template=self.cfg.chat_template)
                prepared.append(self.renderer.prepare(example))
                origins.append((source, raw))
            except (FieldError, DataError) as err:
                self._skip_or_raise(err if isinstance(err, DataError) else raw.error(err.field, err.message))
        units = []
        for (source, raw), rendered in zip(origins, self.renderer.finish(prepared)):
            if self.cfg.task == "preference":
                mismatch = prompt_mismatch(rendered.samples)
                if mismatch is not None:
                    self._skip_or_raise(raw.error("rejected", mismatch))
                    continue
            units += self._keep(rendered, pair_id=pair_id(self.source_keys[source], raw.line))
        return units

    def _skip_or_raise(self, error: DataError) -> None:
        """A bad row: raise (`on_error: raise`) or skip it and count it."""
        if self.cfg.on_error == "raise":
            raise error from None
        self.skips.skipped(error)
        self.counters.skipped_errors += 1

    def _keep(self, rendered: Rendered, pair_id: int) -> list[list[Sample]]:
        self.counters.special_tokens += rendered.special_tokens
        self.counters.expanded += rendered.expanded
        pair = self.cfg.task == "preference"
        units = [rendered.samples] if pair else [[s] for s in rendered.samples]
        kept = []
        for unit in units:
            if unit_length(unit) > self.max_length:
                if self.cfg.overlong == "drop":
                    self.counters.dropped["overlong"] += 1
                    continue
                limit = self.max_length // len(unit)
                unit = [s.truncated(limit) if len(s) > limit else s for s in unit]
                self.counters.truncated += 1
            if any(s.num_trained == 0 for s in unit):
                self.counters.dropped["no_trained_tokens"] += 1
                continue
            if pair:  # the documents of a pair share its stable id (see `pair_id`)
                unit = [replace(s, group=pair_id) for s in unit]
            self.counters.samples += len(unit)
            self.counters.tokens += unit_length(unit)
            self.counters.trained_tokens += sum(s.num_trained for s in unit)
            kept.append(unit)
        return kept

    # ---- state ---------------------------------------------------------------------------------

    def snapshot(self) -> dict:
        """The exact position after the last produced batch (cheap: shares immutable samples)."""
        return {
            "version": STATE_VERSION,
            "layout": self._layout(),
            "mixer": self.mixer.snapshot(),
            "packer": self.packer.snapshot(),
            "ready": [list(row) for row in self._ready],
            "drawn": self._drawn,
            "finished": self._finished,
            "counters": self.counters.copy(),
        }

    def restore(self, state: dict) -> None:
        state = from_serialisable(state)
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported loader state version {state.get('version')}")
        if not self._can_resume_from(state["layout"]):
            raise ValueError(
                f"loader state was saved for {state['layout']}, this loader is {self._layout()}; "
                "resume with the same sources, max_length and packing (and, with shard: samples, "
                "the same batch size, world size and rank)"
            )
        self.mixer.restore(state["mixer"])
        self.packer.restore(state["packer"])
        self._ready = [list(row) for row in state["ready"]]
        self._drawn = state["drawn"]
        self._finished = state["finished"]
        self.counters = state["counters"].copy()

    def _can_resume_from(self, saved: dict) -> bool:
        """With `shard: rows` the state is the global stream's, the same on every rank, so it can
        continue under another batch size, rank or world size; `shard: samples` states are per rank."""
        mine = self._layout()
        if saved.get("shard") == mine["shard"] == "rows":
            per_rank = ("batch_size", "world_size", "rank")
            return {k: v for k, v in saved.items() if k not in per_rank} == {
                k: v for k, v in mine.items() if k not in per_rank
            }
        return saved == mine

    def _layout(self) -> dict:
        return {
            "sources": list(self.source_names),
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "rank": self.rank,
            "max_length": self.max_length,
            "packing": self.cfg.packing,
            "shard": self.cfg.shard,
        }


def to_serialisable(snapshot: dict) -> dict:
    """A snapshot as plain JSON-compatible data (samples become dicts)."""

    packer = snapshot["packer"]
    return {
        **snapshot,
        "packer": {
            **packer,
            "pending": [[c, a, [s.to_dict() for s in unit]] for c, a, unit in packer["pending"]],
        },
        "ready": samples_to_dicts(snapshot["ready"]),
        "counters": asdict(snapshot["counters"]),
    }


def from_serialisable(state: dict) -> dict:
    if isinstance(state.get("counters"), DataCounters):
        return state  # already a live snapshot

    packer = state["packer"]
    return {
        **state,
        "packer": {
            **packer,
            "pending": [(c, a, [Sample.from_dict(s) for s in unit]) for c, a, unit in packer["pending"]],
        },
        "ready": samples_from_dicts(state["ready"]),
        "counters": DataCounters(**state["counters"]),
    }


_END = object()


class DataLoader:
    """Iterable of `PackedBatch` with a background prefetch worker and exact resume.

    Iterating continues from the current position (a new `iter()` does not restart). The worker
    is started lazily and stopped by `load_state_dict` and `close`.
    """

    def __init__(self, pipeline: Pipeline, prefetch: int = 2):
        self.pipeline = pipeline
        self.prefetch = prefetch
        self._consumed = pipeline.snapshot()
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._ended = False

    def __iter__(self) -> DataLoader:
        return self

    def __next__(self) -> PackedBatch:
        if self._ended:
            raise StopIteration
        if self.prefetch == 0:
            try:
                batch = self.pipeline.next_batch()
            except StopIteration:
                self._ended = True
                self._consumed = self.pipeline.snapshot()  # the end: counters include the last rows
                raise
            self._consumed = self.pipeline.snapshot()
            return batch
        if self._thread is None:
            self._start()
        item = self._queue.get()
        if item is _END:
            self._ended = True
            self._join()
            self._consumed = self.pipeline.snapshot()  # the worker is done: the end position
            raise StopIteration
        if isinstance(item, BaseException):
            self._ended = True
            self._join()
            raise item
        batch, self._consumed = item
        return batch

    # ---- state -------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Position after the last batch handed out (JSON-serialisable)."""
        return to_serialisable(self._consumed)

    def position(self) -> dict:
        """The position after the last batch handed out as a live snapshot: cheap (no copy of
        the queued samples) and accepted by `load_state_dict`, but not JSON-serialisable."""
        return self._consumed

    def load_state_dict(self, state: dict) -> None:
        self._shutdown()
        self.pipeline.restore(state)
        self._consumed = self.pipeline.snapshot()
        self._ended = False

    @property
    def counters(self) -> DataCounters:
        """Counters as of the last batch handed out."""
        return self._consumed["counters"]

    @property
    def epoch(self) -> int:
        """Passes completed by the first source (with one source: the epoch)."""
        return self._consumed["mixer"]["streams"][0]["completed"]

    # ---- worker --------------------------------------------------------------------------------

    def _start(self) -> None:
        # The worker continues from where the consumer is; the pipeline's own position equals
        # `_consumed` here because the worker is (re)started only after a shutdown or at first use.
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=self.prefetch)
        # The thread holds the pipeline, queue and event but not the loader, so an abandoned
        # loader is collected and its `__del__` stops the thread.
        self._thread = threading.Thread(
            target=_produce, args=(self.pipeline, self._queue, self._stop),
            name="posttrain-data", daemon=True,
        )
        self._thread.start()

    def _join(self) -> None:
        if self._thread is not None:
            self._thread.join()
        self._thread, self._queue = None, None

    def _shutdown(self) -> None:
        """Stop the worker; the pipeline is then ahead of `_consumed` (restore before reuse)."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread, self._queue = None, None

    def close(self) -> None:
        """Stop the worker; a later iteration continues right after the last consumed batch."""
        if self._thread is None:
            return
        self._shutdown()
        self.pipeline.restore(self._consumed)  # the worker had run ahead

    def __del__(self) -> None:
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()

    def __enter__(self) -> DataLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _produce(pipeline: Pipeline, out: queue.Queue, stop: threading.Event) -> None:
    """Worker loop: batches with the snapshot taken right after each, then an end marker."""
    while not stop.is_set():
        try:
            batch = pipeline.next_batch()
            item: Any = (batch, pipeline.snapshot())
        except StopIteration:
            item = _END
        except BaseException as err:  # handed to the consumer, raised there
            item = err
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                break
            except queue.Full:
                continue
        if item is _END or isinstance(item, BaseException):
            return


def build_loader(
    cfg: DataConfig,
    tokenizer,
    *,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    max_length: int | None = None,
) -> DataLoader:
    """The loader for one rank: `batch_size` rows of `max_length` (default `cfg.max_length`)."""
    if cfg.prefetch:
        # The worker thread gets its own copy: a fast tokenizer call sets state on the shared Rust
        # object (e.g. whether special tokens are split), so two threads must not share one.
        tokenizer = copy.deepcopy(tokenizer)
    pipeline = Pipeline(cfg, tokenizer, batch_size=batch_size, rank=rank, world_size=world_size,
                        seed=seed, max_length=max_length)
    return DataLoader(pipeline, prefetch=cfg.prefetch)
