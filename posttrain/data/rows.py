"""Row schemas: turn a decoded row into one typed example, or say which field is wrong.

Accepted row formats (after the source's field mapping):
- `messages`: an OpenAI-style conversation (system/developer/user/assistant/tool messages, assistant
  `tool_calls`, a per-message `train: true|false`), optional `tools` (function schemas);
- `prompt` + `completion`: each text or a list of messages; only the completion is trained;
- `chosen` + `rejected` (+ optional `prompt`; without it the shared leading messages are the
  prompt): a preference pair for DPO;
- `prompt` + optional `reference`: an RL prompt with its reference answer.
A mapping of columns to roles (GSM8K: `question -> user`, `answer -> assistant`) builds a one-turn
conversation ordered system, user, assistant (not by the mapping's key order).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from posttrain.config.data import ROLE_TARGETS, SourceConfig

ROLES = ("system", "developer", "user", "assistant", "tool")


class FieldError(ValueError):
    """A problem with one field of a row; the pipeline adds the file and line."""

    def __init__(self, field: str | None, message: str):
        self.field, self.message = field, message
        super().__init__(f"field '{field}': {message}" if field else message)


@dataclass
class Conversation:
    messages: list[dict]
    tools: list[dict] | None = None


@dataclass
class TextExample:
    """Plain prompt/completion text for tokenizers without a chat template."""

    prompt: str
    completion: str


@dataclass
class PreferenceExample:
    prompt: list[dict]
    chosen: list[dict]
    rejected: list[dict]
    tools: list[dict] | None = None


@dataclass
class PromptExample:
    messages: list[dict]
    reference: Any = None
    tools: list[dict] | None = None


Example = Conversation | TextExample | PreferenceExample | PromptExample


def apply_field_map(data: dict, fields: dict[str, str]) -> dict:
    """Rename columns per `fields`; columns mapped to roles become a one-turn `messages`.

    The turn is ordered system, user, assistant whatever the mapping's key order: a config that
    went through a key-sorting YAML writer must not turn into answer-before-question rows.
    """
    if not fields:
        return data
    role_columns = sorted(
        ((col, target) for col, target in fields.items() if target in ROLE_TARGETS),
        key=lambda column_role: ROLE_TARGETS.index(column_role[1]),
    )
    if role_columns:
        messages = []
        for column, role in role_columns:
            if column not in data:
                raise FieldError(column, f"missing (the source maps it to {role}); row has {sorted(data)}")
            value = data[column]
            if not isinstance(value, str):
                raise FieldError(column, f"expected a string, got {type(value).__name__}")
            messages.append({"role": role, "content": value})
        out = {k: v for k, v in data.items() if k not in fields}
        out["messages"] = messages
        if "tools" in fields.values():
            tools_column = next(c for c, t in fields.items() if t == "tools")
            out["tools"] = data.get(tools_column)
        return out
    return {fields.get(k, k): v for k, v in data.items()}


def parse_dialogue(text: str, markers: dict[str, str], field: str) -> list[dict]:
    """Raw dialogue text (`"\\n\\nHuman: hi\\n\\nAssistant: hello"`) -> messages, one per marker.

    Each turn's content is the text up to the next marker, stripped of surrounding whitespace;
    text before the first marker is an error (a marker set that does not fit the data).
    """
    pattern = re.compile("|".join(re.escape(m) for m in sorted(markers, key=len, reverse=True)))
    found = list(pattern.finditer(text))
    if not found:
        raise FieldError(field, f"no dialogue marker ({', '.join(map(repr, markers))}) in the text")
    if text[: found[0].start()].strip():
        raise FieldError(field, f"text before the first dialogue marker: {text[: found[0].start()][:40]!r}")
    ends = [m.start() for m in found[1:]] + [len(text)]
    return [{"role": markers[m.group()], "content": text[m.end() : end].strip()} for m, end in zip(found, ends)]


def _apply_dialogue(data: dict, markers: dict[str, str] | None) -> dict:
    if not markers:
        return data
    out = dict(data)
    for name in ("messages", "prompt", "chosen", "rejected"):
        if isinstance(out.get(name), str):
            out[name] = parse_dialogue(out[name], markers, name)
    return out


def check_messages(value: Any, field: str, *, allow_empty: bool = False) -> list[dict]:
    """Validated shallow copies of the messages (keys holding None dropped, as Arrow adds them)."""
    if not isinstance(value, list):
        raise FieldError(field, f"expected a list of messages, got {type(value).__name__}")
    if not value and not allow_empty:
        raise FieldError(field, "empty conversation")
    messages = []
    for i, message in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(message, dict):
            raise FieldError(where, f"expected a message object, got {type(message).__name__}")
        message = {k: v for k, v in message.items() if v is not None}
        role = message.get("role")
        if role is None:
            raise FieldError(f"{where}.role", "missing")
        if role not in ROLES:
            raise FieldError(f"{where}.role", f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
        content = message.get("content")
        if content is None:
            if not (role == "assistant" and message.get("tool_calls")):
                raise FieldError(f"{where}.content", "missing")
        elif isinstance(content, list):
            for j, part in enumerate(content):
                if not isinstance(part, dict):
                    raise FieldError(f"{where}.content[{j}]", "expected a content part object")
        elif not isinstance(content, str):
            raise FieldError(f"{where}.content", f"expected a string, got {type(content).__name__}")
        train = message.get("train")
        if train is not None:
            if not isinstance(train, bool):
                raise FieldError(f"{where}.train", f"expected true or false, got {train!r}")
            if train and role != "assistant":
                raise FieldError(f"{where}.train", f"only assistant messages can be trained, not {role}")
        messages.append(message)
    return messages


def _as_messages(value: Any, field: str, role: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return check_messages(value, field)


def _tools(data: dict) -> list[dict] | None:
    tools = data.get("tools")
    if tools is None:
        return None
    if isinstance(tools, str):  # some datasets store the schemas as a JSON string
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as err:
            raise FieldError("tools", f"malformed JSON: {err.msg}") from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise FieldError("tools", "expected a list of function schemas")
    return tools or None


def _with_system(messages: list[dict], system_prompt: str | None) -> list[dict]:
    if system_prompt is None or (messages and messages[0]["role"] in ("system", "developer")):
        return messages
    return [{"role": "system", "content": system_prompt}, *messages]


def _untrained(messages: list[dict]) -> list[dict]:
    """Prompt messages never train (an explicit `train: true` in a prompt is kept)."""
    return [m if "train" in m else {**m, "train": False} for m in messages]


def parse_row(data: dict, source: SourceConfig, *, task: str, chat_template: bool = True) -> Example:
    """The typed example of one decoded row, for `task` ("sft", "preference" or "prompt")."""
    data = _apply_dialogue(apply_field_map(data, source.fields), source.dialogue)
    tools = _tools(data)
    if task == "preference":
        return _parse_preference(data, source, tools)
    if task == "prompt":
        if "prompt" in data:
            messages = _as_messages(data["prompt"], "prompt", "user")
        elif "messages" in data:
            messages = check_messages(data["messages"], "messages")
        else:
            raise FieldError("prompt", f"missing; row has {sorted(data)}")
        messages = _with_system(messages, source.system_prompt)
        return PromptExample(messages, data.get("reference"), tools)
    if "messages" in data:
        messages = check_messages(data["messages"], "messages")
        return Conversation(_with_system(messages, source.system_prompt), tools)
    if "prompt" in data and "completion" in data:
        prompt, completion = data["prompt"], data["completion"]
        if not chat_template:
            for name, value in (("prompt", prompt), ("completion", completion)):
                if not isinstance(value, str):
                    raise FieldError(name, "expected text (data.chat_template is false)")
            return TextExample(prompt, completion)
        prompt_msgs = _untrained(_as_messages(prompt, "prompt", "user"))
        completion_msgs = _as_messages(completion, "completion", "assistant")
        return Conversation(_with_system(prompt_msgs + completion_msgs, source.system_prompt), tools)
    if "chosen" in data or "rejected" in data:
        raise FieldError("messages", "a preference row (chosen/rejected); set data.task: preference")
    raise FieldError(
        "messages",
        f"missing; the row has neither messages nor prompt/completion (columns {sorted(data)}); "
        "map columns with the source's fields",
    )


def _parse_preference(data: dict, source: SourceConfig, tools: list[dict] | None) -> PreferenceExample:
    for name in ("chosen", "rejected"):
        if name not in data:
            raise FieldError(name, f"missing; row has {sorted(data)}")
    if "prompt" in data:
        prompt = _as_messages(data["prompt"], "prompt", "user")
        chosen = _as_messages(data["chosen"], "chosen", "assistant")
        rejected = _as_messages(data["rejected"], "rejected", "assistant")
    else:  # full conversations: the shared leading messages are the prompt
        prompt, chosen, rejected = _split_shared_prompt(
            check_messages(data["chosen"], "chosen"), check_messages(data["rejected"], "rejected")
        )
    for name, messages in (("chosen", chosen), ("rejected", rejected)):
        if not any(m["role"] == "assistant" for m in messages):
            raise FieldError(name, "has no assistant message after the prompt")
        for i, m in enumerate(messages):
            if m["role"] == "assistant" and isinstance(m.get("content"), str) and not m["content"].strip():
                raise FieldError(f"{name}[{i}].content", "empty reply")
    if chosen == rejected:
        raise FieldError("rejected", "equals chosen; a preference pair needs two different replies")
    prompt = _untrained(_with_system(prompt, source.system_prompt))
    return PreferenceExample(prompt, chosen, rejected, tools)


def _split_shared_prompt(chosen_all: list[dict], rejected_all: list[dict]) -> tuple[list, list, list]:
    """(prompt, chosen, rejected): the longest shared leading messages are the prompt, and what
    follows must be one final assistant reply on each side, so that only the replies are scored."""
    shared = 0
    while shared < min(len(chosen_all), len(rejected_all)) - 1 and chosen_all[shared] == rejected_all[shared]:
        shared += 1
    if shared == 0:
        raise FieldError("chosen", "chosen and rejected share no prompt messages")
    chosen, rejected = chosen_all[shared:], rejected_all[shared:]
    for name, messages in (("chosen", chosen), ("rejected", rejected)):
        if len(messages) != 1 or messages[0]["role"] != "assistant":
            raise FieldError(
                name,
                f"chosen and rejected differ before their last reply: after {shared} shared messages "
                f"chosen has {len(chosen)} and rejected {len(rejected)} ({', '.join(m['role'] for m in messages)} "
                f"in {name}); only one final assistant reply per side may differ",
            )
    return chosen_all[:shared], chosen, rejected
