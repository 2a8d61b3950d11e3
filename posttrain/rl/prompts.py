"""RL prompts: prompt rows -> rendered prompt ids with their reference answers, resumable.

The global stream is the same on every rank (the mixer of `data.sources`, seeded); a rollout draws
`prompts_per_step` prompts and each data-parallel rank generates for its share. A prompt keeps its
global draw number, which seeds its samples, so what a prompt's samples are does not depend on
how prompts are split over ranks. Malformed rows follow `data.on_error` (raise naming file, line
and field, or skip and count); prompts too long to leave room for `max_new_tokens` in a row are
dropped and counted (`data.dropped.overlong`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posttrain.config.data import DataConfig
from posttrain.data.chat import ChatRenderer
from posttrain.data.loader import DataCounters
from posttrain.data.mixing import Mixer, SourceStream
from posttrain.data.rows import FieldError, PromptExample, parse_row
from posttrain.data.skips import DataQualityError, SkipWatch, empty_data_message
from posttrain.data.sources import DataError, open_source


@dataclass
class Prompt:
    index: int  # global draw number: seeds the prompt's samples
    ids: list[int]  # rendered up to the generation prompt
    text: str  # the last user message, what reward functions see as the prompt
    reference: Any  # the row's reference answer (None when it has none)


class PromptStream:
    """Draws rendered prompts from `cfg.sources` (`data.task: prompt`)."""

    def __init__(self, cfg: DataConfig, tokenizer, *, seed: int, max_prompt_tokens: int):
        self.cfg, self.max_prompt_tokens = cfg, max_prompt_tokens
        data_seed = cfg.seed if cfg.seed is not None else seed
        streams = [SourceStream(open_source(s), index=i, seed=data_seed, shuffle=cfg.shuffle,
                                buffer_size=cfg.shuffle_buffer) for i, s in enumerate(cfg.sources)]
        self.mixer = Mixer(streams, [s.weight for s in cfg.sources], seed=data_seed, epochs=cfg.epochs)
        self.renderer = ChatRenderer(tokenizer, special_tokens=cfg.special_tokens)
        self.counters = DataCounters()
        self.skips = SkipWatch(cfg.max_skipped_fraction, log=True)
        self.drawn = 0
        self.names = [s.name or Path(s.path).name for s in cfg.sources]

    @property
    def epoch(self) -> int:
        return min(s.completed for s in self.mixer.streams)

    def next(self, count: int) -> list[Prompt]:
        """The next `count` usable prompts (fewer only when the data ends)."""
        prompts: list[Prompt] = []
        while len(prompts) < count:
            drawn = self.mixer.next()
            if drawn is None:
                if not prompts and self.counters.samples == 0:
                    raise DataQualityError(empty_data_message(self.counters))
                break
            source, raw = drawn
            self.counters.rows_read += 1
            prompt = self._render(source, raw)
            if prompt is not None:
                prompts.append(prompt)
            self.skips.after_chunk(1, int(prompt is not None), self.mixer.streams, self.counters,
                                   ended=self.mixer.done)
        return prompts

    def _render(self, source: int, raw) -> Prompt | None:
        try:
            example = parse_row(raw.load(), self.cfg.sources[source], task="prompt")
            assert isinstance(example, PromptExample)
            rendered = self.renderer.render_prompt(example)
        except (FieldError, DataError) as err:
            error = err if isinstance(err, DataError) else raw.error(err.field, err.message)
            if self.cfg.on_error == "raise":
                raise error from None
            self.skips.skipped(error)
            self.counters.skipped_errors += 1
            return None
        if len(rendered.input_ids) > self.max_prompt_tokens:
            self.counters.dropped["overlong"] += 1
            return None
        users = [m for m in example.messages if m["role"] == "user"]
        text = users[-1]["content"] if users else ""
        self.counters.samples += 1
        index, self.drawn = self.drawn, self.drawn + 1
        return Prompt(index, rendered.input_ids, text if isinstance(text, str) else str(text), example.reference)

    def snapshot(self) -> dict:
        return {"sources": self.names, "mixer": self.mixer.snapshot(), "drawn": self.drawn,
                "counters": self.counters.as_dict()}

    def restore(self, state: dict) -> None:
        if state["sources"] != self.names:
            raise ValueError(f"prompt stream state was saved for sources {state['sources']}, the config has "
                             f"{self.names}")
        self.mixer.restore(state["mixer"])
        self.drawn = state["drawn"]
        counters = dict(state["counters"])
        counters.pop("packing_efficiency", None)
        self.counters = DataCounters(**counters)
