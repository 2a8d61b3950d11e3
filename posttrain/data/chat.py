"""Render examples through the tokenizer's own chat template into ids and shifted labels.

The mask is derived on the rendered *text*, never by re-implementing a template:

1. Render the whole conversation once with the tokenizer's template.
2. Find each trained assistant turn's character span: from `{% generation %}` blocks when the
   template has them; otherwise by rendering the prefix before the turn (with the generation
   prompt) and the prefix through the turn, and checking both are prefixes of the full text. The
   span runs from the end of the first to the last control token (e.g. `<|im_end|>`) inside the
   second, so the end-of-turn token is trained and the template's trailing newline is not.
3. Tokenize the full text once and train every token that overlaps a span. A token merged across a
   template/content boundary is kept as the tokenizer made it (the context is exactly the full
   text's tokenization) and is trained when it overlaps the turn.

A template that rewrites earlier turns (e.g. drops earlier reasoning) fails the prefix check: a
`FieldError`, or with `template_rewrite="expand"` one sample per trained turn, each rendered as
the model sees it at inference.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from posttrain.data.batch import IGNORE_INDEX, Sample
from posttrain.data.rows import (
    Conversation,
    Example,
    FieldError,
    PreferenceExample,
    PromptExample,
    TextExample,
)

_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
# Private-use placeholders that stand in for escaped special-token strings during rendering.
_PH_OPEN, _PH_CLOSE = "\U000f0a00", "\U000f0a01"
_PH_RE = re.compile(f"{_PH_OPEN}(\\d+){_PH_CLOSE}")

Span = tuple[int, int]


@dataclass
class Rendered:
    """The samples of one example (several for an expanded conversation or a preference pair)."""

    samples: list[Sample]
    special_tokens: bool = False  # content held special-token strings (escaped or allowed)
    expanded: bool = False  # template rewrote earlier turns: one sample per trained turn


@dataclass
class _Doc:
    """One document before tokenization: text, trained character spans, plain-text extras."""

    text: _Text
    spans: list[Span]
    bos: list[int] = field(default_factory=list)  # ids before the text (plain-text mode)
    eos: int | None = None  # trained id after the text (plain-text mode)


@dataclass
class Prepared:
    """An example rendered to text with its trained spans, waiting for (batched) tokenization."""

    docs: list[_Doc]
    special_tokens: bool = False
    expanded: bool = False


@dataclass
class PromptSample:
    """An RL prompt: ids up to and including the generation prompt, plus the reference answer."""

    input_ids: list[int]
    reference: Any = None
    messages: list[dict] = field(default_factory=list)


@dataclass
class _Text:
    """Rendered text with escaped special strings restored; `remap` maps placeholder positions."""

    text: str
    plain: list[Span]  # ranges to encode as plain text
    remap: Callable[[int], int]


class ChatRenderer:
    """Renders examples for one tokenizer; facts about the tokenizer are computed once."""

    def __init__(
        self,
        tokenizer,
        *,
        train_on: str = "all",
        special_tokens: str = "error",
        template_rewrite: str = "error",
    ):
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("posttrain needs a fast tokenizer (character offsets) for loss masks")
        self.tok = tokenizer
        self.train_on = train_on
        self.special_tokens = special_tokens
        self.template_rewrite = template_rewrite
        template_text = ""
        try:
            template_text = str(tokenizer.get_chat_template())
        except ValueError:
            pass  # no template: only plain-text examples can be rendered
        controls = {
            t.content
            for t in tokenizer.added_tokens_decoder.values()
            if t.content.strip() and (t.special or t.content in template_text)
        }
        self.control_strings = sorted(controls, key=len, reverse=True)
        self._control_re = (
            re.compile("|".join(map(re.escape, self.control_strings))) if controls else None
        )
        self._newline_ids = self._encode("\n", plain=False)[0]
        self._bos_ids = self._leading_bos()

    # ---- public entry points ---------------------------------------------------------------

    def render(self, example: Example) -> Rendered:
        return self.finish([self.prepare(example)])[0]

    def render_conversation(self, messages: list[dict], *, tools: list[dict] | None = None) -> Rendered:
        return self.finish([self._prepare_conversation(messages, tools)])[0]

    def render_preference(self, example: PreferenceExample) -> Rendered:
        return self.finish([self._prepare_preference(example)])[0]

    def render_text(self, prompt: str, completion: str) -> Rendered:
        """Plain text (no chat template): tokenizer's own BOS, prompt, completion, EOS trained."""
        return self.finish([self._prepare_text(prompt, completion)])[0]

    def prepare(self, example: Example) -> Prepared:
        """Render text and find trained spans (no tokenization yet; see `finish`)."""
        if isinstance(example, Conversation):
            return self._prepare_conversation(example.messages, example.tools)
        if isinstance(example, TextExample):
            return self._prepare_text(example.prompt, example.completion)
        if isinstance(example, PreferenceExample):
            return self._prepare_preference(example)
        raise TypeError(f"cannot render {type(example).__name__} as a training sample")

    def finish(self, prepared: list[Prepared]) -> list[Rendered]:
        """Tokenize the documents of many prepared examples in one batched call."""
        docs = [doc for p in prepared for doc in p.docs]
        encoded = iter(self._tokenize_many([doc.text for doc in docs]))
        out = []
        for p in prepared:
            samples = [_doc_sample(doc, *next(encoded)) for doc in p.docs]
            out.append(Rendered(samples, p.special_tokens, p.expanded))
        return out

    # ---- preparing documents ---------------------------------------------------------------

    def _prepare_conversation(self, messages: list[dict], tools: list[dict] | None) -> Prepared:
        trained = self._trained_turns(messages)
        clean, originals = self._clean_messages(messages)
        template = self._template(tools)
        special = bool(originals)
        if not trained:  # nothing to train: one all-ignored sample (the loader drops and counts it)
            return Prepared([self._doc(self._render(template, clean, tools), [], originals)], special)

        if _GENERATION_TAG.search(template):
            full, blocks = self._render_tracked(template, clean, tools)
            spans = self._select_blocks(messages, trained, blocks)
            return Prepared([self._doc(full, spans, originals)], special)

        full = self._render(template, clean, tools)
        spans = []
        for i in trained:
            span = self._turn_span(template, clean, tools, i, full)
            if span is None:
                break
            spans.append(span)
        else:
            return Prepared([self._doc(full, spans, originals)], special)

        if self.template_rewrite != "expand":
            raise FieldError(
                "messages",
                "the chat template rewrites earlier turns (a rendered prefix is not a prefix of the "
                "full conversation), so one mask cannot match what the model sees; set "
                "data.template_rewrite: expand for one sample per assistant turn",
            )
        docs = []
        for i in trained:
            text = self._render(template, clean[: i + 1], tools)
            span = self._turn_span(template, clean, tools, i, text)
            if span is None:
                raise FieldError(f"messages[{i}]", "the template renders this turn differently as a prefix")
            docs.append(self._doc(text, [span], originals))
        return Prepared(docs, special, expanded=True)

    def _prepare_preference(self, example: PreferenceExample) -> Prepared:
        chosen = self._prepare_conversation(example.prompt + example.chosen, example.tools)
        rejected = self._prepare_conversation(example.prompt + example.rejected, example.tools)
        if chosen.expanded or rejected.expanded:
            raise FieldError("chosen", "the template rewrites earlier turns; a pair needs one sample each")
        return Prepared(chosen.docs + rejected.docs, chosen.special_tokens or rejected.special_tokens)

    def _prepare_text(self, prompt: str, completion: str) -> Prepared:
        eos = self.tok.eos_token_id
        if eos is None:
            raise ValueError("the tokenizer has no EOS token to end plain-text completions")
        originals: list[str] = []
        prompt = self._escape(prompt, "prompt", originals)
        completion = self._escape(completion, "completion", originals)
        text = self._restore(prompt + completion, originals)
        span = (text.remap(len(prompt)), len(text.text))
        return Prepared([_Doc(text, [span], bos=self._bos_ids, eos=eos)], bool(originals))

    def _doc(self, text: str, spans: list[Span], originals: list[str]) -> _Doc:
        restored = self._restore(text, originals)
        return _Doc(restored, [(restored.remap(s), restored.remap(e)) for s, e in spans])

    def render_prompt(self, example: PromptExample) -> PromptSample:
        """Prompt ids for generation: the conversation plus the template's generation prompt."""
        clean, originals = self._clean_messages(example.messages)
        text = self._render(self._template(example.tools), clean, example.tools, generation_prompt=True)
        ids, _ = self._tokenize(self._restore(text, originals))
        return PromptSample(ids, example.reference, example.messages)

    # ---- turn selection and spans ----------------------------------------------------------

    def _trained_turns(self, messages: list[dict]) -> list[int]:
        assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        default = set(assistant if self.train_on == "all" else assistant[-1:])
        return [i for i in assistant if messages[i].get("train", i in default)]

    def _select_blocks(self, messages: list[dict], trained: list[int], blocks: list[Span]) -> list[Span]:
        assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if len(blocks) == len(assistant):
            return [span for i, span in zip(assistant, blocks) if i in trained]
        if trained == assistant:
            return blocks
        raise FieldError(
            "messages",
            f"the template marks {len(blocks)} generation blocks for {len(assistant)} assistant "
            "turns, so single turns cannot be selected (train_on: last or train: false)",
        )

    def _turn_span(self, template, clean, tools, i: int, full: str) -> Span | None:
        """Span of assistant turn `i` in `full`, or None if a rendered prefix doesn't match."""
        before = self._render(template, clean[:i], tools, generation_prompt=True)
        through = full if i == len(clean) - 1 else self._render(template, clean[: i + 1], tools)
        if not (full.startswith(before) and full.startswith(through) and len(through) > len(before)):
            return None
        start, end = len(before), len(through)
        last_control = None
        if self._control_re is not None:
            for m in self._control_re.finditer(through, start, end):
                last_control = m.end()
        if last_control is not None:
            end = last_control
        else:  # no end-of-turn token: the turn text without trailing whitespace
            end = start + len(through[start:end].rstrip())
        return start, end

    # ---- rendering ---------------------------------------------------------------------------

    def _template(self, tools) -> str:
        try:
            return self.tok.get_chat_template(None, tools)
        except ValueError:
            raise ValueError(
                "the tokenizer has no chat template; use a chat model's tokenizer, or plain "
                "prompt/completion text with data.chat_template: false"
            ) from None

    def _render(self, template, messages, tools, *, generation_prompt: bool = False) -> str:
        return self._render_raw(template, messages, tools, generation_prompt, track=False)[0]

    def _render_tracked(self, template, messages, tools) -> tuple[str, list[Span]]:
        return self._render_raw(template, messages, tools, False, track=True)

    def _render_raw(self, template, messages, tools, generation_prompt, track):
        from transformers.utils.chat_template_utils import render_jinja_template

        try:
            texts, indices = render_jinja_template(
                conversations=[messages],
                tools=tools,
                chat_template=template,
                return_assistant_tokens_mask=track,
                add_generation_prompt=generation_prompt,
                **self.tok.special_tokens_map,
            )
        except Exception as err:  # jinja's TemplateError and the template's raise_exception
            raise FieldError("messages", f"the chat template failed: {err}") from None
        return texts[0], (list(indices[0]) if track else [])

    def _clean_messages(self, messages: list[dict]) -> tuple[list[dict], list[str]]:
        """Messages as the template sees them (our keys removed, special strings handled)."""
        originals: list[str] = []
        clean = []
        for i, message in enumerate(messages):
            out = {k: v for k, v in message.items() if k != "train"}
            content = out.get("content")
            if isinstance(content, str):
                out["content"] = self._escape(content, f"messages[{i}].content", originals)
            elif isinstance(content, list):
                parts = []
                for j, part in enumerate(content):
                    if isinstance(part.get("text"), str):
                        where = f"messages[{i}].content[{j}].text"
                        part = {**part, "text": self._escape(part["text"], where, originals)}
                    parts.append(part)
                out["content"] = parts
            clean.append(out)
        return clean, originals

    def _escape(self, value: str, where: str, originals: list[str]) -> str:
        """Apply the special-token policy to one content string."""
        if self._control_re is None:
            return value
        found = self._control_re.search(value)
        if found is None:
            return value
        if self.special_tokens == "error":
            raise FieldError(
                where,
                f"contains the special token {found.group(0)!r}; set data.special_tokens: escape "
                "(encode it as text) or allow (let it act as the control token)",
            )
        if self.special_tokens == "allow":
            originals.append("")  # counted, left as is
            return value

        def placeholder(m: re.Match) -> str:
            originals.append(m.group(0))
            return f"{_PH_OPEN}{len(originals) - 1}{_PH_CLOSE}"

        return self._control_re.sub(placeholder, value)

    def _restore(self, text: str, originals: list[str]) -> _Text:
        """Put escaped strings back; remember where they are so they are encoded as plain text."""
        if not any(originals):
            return _Text(text, [], lambda p: p)
        pieces, plain, ends, deltas = [], [], [], []
        pos = delta = 0
        for m in _PH_RE.finditer(text):
            original = originals[int(m.group(1))]
            pieces.append(text[pos : m.start()])
            start = m.start() + delta
            pieces.append(original)
            plain.append((start, start + len(original)))
            delta += len(original) - (m.end() - m.start())
            ends.append(m.end())
            deltas.append(delta)
            pos = m.end()
        pieces.append(text[pos:])

        def remap(p: int) -> int:
            k = bisect.bisect_right(ends, p)
            return p + (deltas[k - 1] if k else 0)

        return _Text("".join(pieces), plain, remap)

    # ---- tokenization --------------------------------------------------------------------------

    def _tokenize_many(self, texts: list[_Text]) -> list[tuple[list[int], list[Span]]]:
        """Texts without escaped ranges go through one batched tokenizer call."""
        out: list = [None] * len(texts)
        simple = [i for i, t in enumerate(texts) if not t.plain]
        if simple:
            enc = self.tok([texts[i].text for i in simple], add_special_tokens=False,
                           return_offsets_mapping=True)
            for k, i in enumerate(simple):
                out[i] = (list(enc["input_ids"][k]), [tuple(o) for o in enc["offset_mapping"][k]])
        for i, text in enumerate(texts):
            if out[i] is None:
                out[i] = self._tokenize(text)
        return out

    def _tokenize(self, text: _Text) -> tuple[list[int], list[Span]]:
        """Encode `text`; escaped ranges become exactly the tokenizer's plain-text encoding.

        The tokenizer splits its input at control tokens and encodes each stretch between them
        on its own. We do the same, splitting only at the template's real control tokens: each
        stretch is encoded with `split_special_tokens`, so an escaped control-token string is
        plain text *and merges with its neighbours* as in `tokenizer(content,
        split_special_tokens=True)` (e.g. `Ġ<` rather than `Ġ`, `<`).
        """
        if not text.plain:
            return self._encode(text.text, plain=False)
        ids: list[int] = []
        offsets: list[Span] = []
        pos = 0
        for m in self._control_re.finditer(text.text):
            if any(s <= m.start() < e for s, e in text.plain):
                continue  # an escaped string: part of the stretch
            for s, e, plain in ((pos, m.start(), True), (m.start(), m.end(), False)):
                if s < e:
                    piece_ids, piece_offsets = self._encode(text.text[s:e], plain=plain, after_start=s > 0)
                    ids += piece_ids
                    offsets += [(a + s, b + s) for a, b in piece_offsets]
            pos = m.end()
        if pos < len(text.text):
            piece_ids, piece_offsets = self._encode(text.text[pos:], plain=True, after_start=pos > 0)
            ids += piece_ids
            offsets += [(a + pos, b + pos) for a, b in piece_offsets]
        return ids, offsets

    def _encode(self, text: str, *, plain: bool, after_start: bool = False):
        """One encode call. A piece that doesn't start the text is encoded after a newline which is
        then removed, so tokenizers that prepend a space to every input don't add one mid-text."""
        if after_start:
            enc = self.tok("\n" + text, add_special_tokens=False, return_offsets_mapping=True,
                           split_special_tokens=plain)
            n = len(self._newline_ids)
            if enc["input_ids"][:n] == self._newline_ids:
                return enc["input_ids"][n:], [(a - 1, b - 1) for a, b in enc["offset_mapping"][n:]]
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True,
                       split_special_tokens=plain)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]

    def _leading_bos(self) -> list[int]:
        """The BOS the tokenizer itself adds to plain text (none for most chat tokenizers)."""
        bos = self.tok.bos_token_id
        if bos is None:
            return []
        with_special = self.tok("a", add_special_tokens=True)["input_ids"]
        return [bos] if with_special and with_special[0] == bos else []


def _mark(offsets: list[Span], spans: list[Span]) -> list[bool]:
    """True for every token whose character range overlaps a span (offsets in text order)."""
    trained = [False] * len(offsets)
    if not spans:
        return trained
    starts = [a for a, _ in offsets]
    ends = [b for _, b in offsets]
    for s, e in spans:
        first = bisect.bisect_right(ends, s)  # first token ending after the span starts
        last = bisect.bisect_left(starts, e)  # first token starting at or after the span ends
        trained[first:last] = [True] * max(0, last - first)
    return trained


def _doc_sample(doc: _Doc, ids: list[int], offsets: list[Span]) -> Sample:
    trained = _mark(offsets, doc.spans)
    if doc.bos:
        ids, trained = doc.bos + ids, [False] * len(doc.bos) + trained
    if doc.eos is not None:
        ids, trained = ids + [doc.eos], trained + [True]
    return _labels(ids, trained)


def _labels(ids: list[int], trained: list[bool]) -> Sample:
    """Shift once: position t predicts token t+1 when that token is trained."""
    labels = [ids[t + 1] if trained[t + 1] else IGNORE_INDEX for t in range(len(ids) - 1)]
    labels.append(IGNORE_INDEX)
    return Sample(list(ids), labels)


def render_messages(tokenizer, messages: list[dict], *, tools: list[dict] | None = None, **options) -> Sample:
    """Convenience: one conversation -> one Sample (options as in `ChatRenderer`)."""
    from posttrain.data.rows import check_messages

    rendered = ChatRenderer(tokenizer, **options).render_conversation(
        check_messages(messages, "messages"), tools=tools
    )
    if len(rendered.samples) != 1:
        raise ValueError("the conversation expanded into several samples; use ChatRenderer.render")
    return rendered.samples[0]
