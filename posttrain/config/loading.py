"""Load a recipe config: YAML file + dotted `key=value` overrides -> validated pydantic model.

Errors are collected and reported together, each with the key path (`train.lr`), the value that
was given, what is allowed, and where it came from (`sft.yaml:12` or the override text). Paths in
a config (model, data) are relative to the working directory, not to the config file.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar, get_args

import yaml
from pydantic import BaseModel, ValidationError

from posttrain.config.base import FieldError

T = TypeVar("T", bound=BaseModel)
KeyPath = tuple[str, ...]


class ConfigError(ValueError):
    """A config that can't be used; the message lists every problem found."""


# ----------------------------------------------------------------------------- YAML reading


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads `2e-5` as a float (as YAML 1.2 does) and rejects duplicate keys."""

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first on line {seen[key]})", key_node.start_mark
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _key_lines(node: yaml.Node | None, prefix: KeyPath = ()) -> dict[KeyPath, int]:
    """Line number (1-based) of every key in a composed YAML document."""
    lines: dict[KeyPath, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            path = prefix + (str(key_node.value),)
            lines[path] = key_node.start_mark.line + 1
            lines.update(_key_lines(value_node, path))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            path = prefix + (str(i),)
            lines[path] = item.start_mark.line + 1
            lines.update(_key_lines(item, path))
    return lines


def read_yaml(path: str | Path) -> tuple[dict[str, Any], dict[KeyPath, int]]:
    """The mapping in a YAML file and the line of each of its keys."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    text = path.read_text()
    try:
        loader = _Loader(text)
        try:
            node = loader.get_single_node()
            data = loader.construct_document(node) if node is not None else {}
        finally:
            loader.dispose()
    except yaml.YAMLError as err:
        raise ConfigError(f"invalid YAML in {path}: {err}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data, _key_lines(node)


def parse_value(text: str) -> Any:
    """A YAML scalar or flow collection: `2e-5` -> float, `[a, b]` -> list, `null` -> None."""
    return yaml.load(text, Loader=_Loader)


# ----------------------------------------------------------------------------- overrides


def parse_override(text: str) -> tuple[KeyPath, Any]:
    """`train.lr=2e-5` -> (("train", "lr"), 2e-05)."""
    key, sep, raw = text.partition("=")
    parts = tuple(key.strip().split("."))
    if not sep or not all(parts) or any(not re.fullmatch(r"[\w\-]+", p) for p in parts):
        raise ConfigError(f"override {text!r}: expected key.path=value, e.g. train.lr=2e-5")
    try:
        value = parse_value(raw)
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: the value is not valid YAML: {err}") from None
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """A copy of `data` with each `key.path=value` set (intermediate sections created as needed).

    A numeric part indexes a list (`data.sources.0.path=x.jsonl`).
    """
    data = copy.deepcopy(data)
    for text in overrides:
        parts, value = parse_override(text)
        node: Any = data
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            where = ".".join(parts[: depth + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(
                        f"override {text!r}: {'.'.join(parts[:depth])} is a list of {len(node)} "
                        f"entries; {part!r} is not an index into it"
                    )
                index = int(part)
                if last:
                    node[index] = value
                else:
                    node = node[index]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    if part not in node or node[part] is None:
                        node[part] = {}
                    node = node[part]
            else:
                parent = ".".join(parts[:depth])
                raise ConfigError(
                    f"override {text!r}: {parent} is a value ({node!r}), not a section, so "
                    f"{where} can't be set"
                )
    return data


# ----------------------------------------------------------------------------- loading


def load_config(path: str | Path, overrides: Sequence[str], cls: type[T]) -> T:
    """Read `path`, apply `overrides` (`key.path=value`, values parsed as YAML) and validate as `cls`.

    Raises `ConfigError` (a ValueError) listing every problem, or `FileNotFoundError`.
    """
    data, lines = read_yaml(path)
    data = apply_overrides(data, overrides)
    origins: dict[KeyPath, str] = {k: f"{path}:{n}" for k, n in lines.items()}
    for text in overrides:
        origins[parse_override(text)[0]] = f"override {text!r}"
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, cls, origins, source=str(path))) from None


def validate_config(data: dict[str, Any], cls: type[T], source: str = "<dict>") -> T:
    """Validate an in-memory mapping with the same error messages as `load_config`."""
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, cls, {}, source=source)) from None


# ----------------------------------------------------------------------------- error messages


def _model_classes(annotation: Any) -> list[type[BaseModel]]:
    """Config classes found in an annotation (through Optional / Union / list / dict)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found: list[type[BaseModel]] = []
    for arg in get_args(annotation):
        found.extend(_model_classes(arg))
    return found


def _section_at(cls: type[BaseModel], path: KeyPath) -> type[BaseModel] | None:
    """The config class that holds the keys under `path` (list indices skipped)."""
    current: Any = cls
    for part in path:
        if part.isdigit():
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = current.model_fields.get(part)
        if field is None:
            return None
        classes = _model_classes(field.annotation)
        if not classes:
            return None
        current = classes[0]
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _paths_of_key(cls: type[BaseModel], key: str, prefix: KeyPath = (), depth: int = 3) -> list[str]:
    """Dotted paths of every field named `key` in `cls` and its sub-sections."""
    hits: list[str] = []
    for name, field in cls.model_fields.items():
        if name == key:
            hits.append(".".join(prefix + (name,)))
        if depth > 0:
            for sub in _model_classes(field.annotation)[:1]:
                hits.extend(_paths_of_key(sub, key, prefix + (name,), depth - 1))
    return hits


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _origin_of(path: KeyPath, origins: dict[KeyPath, str]) -> str | None:
    for end in range(len(path), 0, -1):
        if path[:end] in origins:
            return origins[path[:end]]
    return None


def _describe(error: dict[str, Any], cls: type[BaseModel]) -> tuple[KeyPath, str]:
    """(key path, message) for one pydantic error."""
    path: KeyPath = tuple(str(p) for p in error["loc"])
    kind = error["type"]
    ctx = error.get("ctx") or {}
    value = error.get("input")
    original = ctx.get("error")
    if isinstance(original, FieldError):
        return path + tuple(original.field.split(".")), str(original)
    if kind == "extra_forbidden":
        section = _section_at(cls, path[:-1])
        key = path[-1]
        allowed = sorted(section.model_fields) if section else []
        message = "unknown key"
        close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
        elsewhere = [p for p in _paths_of_key(cls, key) if p != ".".join(path)]
        if close:
            message += f"; did you mean {'.'.join(path[:-1] + (close[0],))}?"
        elif elsewhere:
            message += f"; did you mean {' or '.join(elsewhere)}?"
        if allowed:
            where = ".".join(path[:-1]) or "the top level"
            message += f" (keys allowed in {where}: {', '.join(allowed)})"
        return path, message
    if kind == "missing":
        return path, "required key is missing"
    message = error["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
    if kind == "literal_error":
        options = re.findall(r"'([^']*)'", str(ctx.get("expected", "")))
        close = difflib.get_close_matches(str(value), options, n=1, cutoff=0.6)
        if close:
            message += f"; did you mean {close[0]!r}?"
    if not isinstance(value, (dict, BaseModel)) and kind != "value_error":
        message += f" (got {_short(value)})"
    return path, message


def format_validation_error(
    err: ValidationError,
    cls: type[BaseModel],
    origins: dict[KeyPath, str],
    source: str,
) -> str:
    """One line per problem: `key.path: what is wrong (got value) [where]`."""
    problems = []
    for error in err.errors():
        path, message = _describe(error, cls)
        dotted = ".".join(path) or "(top level)"
        if message.startswith(f"{dotted}.") or message.startswith(f"{dotted}:"):
            line = f"  {message}"  # the message already names its path
        else:
            line = f"  {dotted}: {message}"
        origin = _origin_of(path, origins)
        if origin is not None:
            line += f"  [{origin}]"
        problems.append(line)
    count = len(problems)
    header = f"invalid config {source} ({count} problem{'s' if count != 1 else ''}):"
    return "\n".join([header, *problems])


# ----------------------------------------------------------------------------- saving


def to_yaml(cfg: BaseModel) -> str:
    """The resolved config as YAML (every default filled in); loads back to an equal config."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write `text` to `path` atomically (a temporary file beside it, then a rename): a reader sees
    the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def save_resolved(cfg: BaseModel, path: str | Path) -> Path:
    """Write `to_yaml(cfg)` to `path` atomically."""
    return write_text_atomic(path, to_yaml(cfg))


def config_hash(cfg: BaseModel, exclude: Iterable[str] = ("checkpoint.resume",)) -> str:
    """sha256 (hex) of the resolved config, leaving out dotted `exclude` paths.

    `checkpoint.resume` is left out by default: changing how a run resumes does not change it.
    """
    data = cfg.model_dump(mode="json")
    for dotted in exclude:
        *parents, leaf = dotted.split(".")
        node: Any = data
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


__all__ = [
    "ConfigError",
    "apply_overrides",
    "config_hash",
    "format_validation_error",
    "load_config",
    "parse_override",
    "parse_value",
    "read_yaml",
    "save_resolved",
    "write_text_atomic",
    "to_yaml",
    "validate_config",
]
