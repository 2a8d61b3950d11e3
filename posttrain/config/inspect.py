"""The config `posttrain data inspect` reads: a recipe file (or one holding only `data:`).

It is validated by the same loader as every recipe command (`load_config`: line numbers, dotted
`key=value` overrides, did-you-mean, every problem at once). `data` is validated in full, `model`
when present (it names the tokenizer); the recipe's other sections are left to the recipe's
command, but a top-level key that no recipe config knows is an error.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from pydantic import create_model, model_validator

from posttrain.config.base import Section
from posttrain.config.data import DataConfig
from posttrain.config.distill import StudentModelConfig
from posttrain.config.recipe import RecipeConfig, check_sources_exist


def recipe_sections() -> set[str]:
    """Top-level keys of every recipe config (all modules of `posttrain.config` imported)."""
    import posttrain.config as package

    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{module.name}")
    found: set[str] = set()
    pending: list[type[RecipeConfig]] = [RecipeConfig]
    while pending:
        cls = pending.pop()
        found |= set(cls.model_fields)
        pending += cls.__subclasses__()
    return found


class _InspectBase(Section):
    @model_validator(mode="after")
    def _sources_exist(self) -> _InspectBase:
        check_sources_exist(self.data.sources, "data.sources")  # type: ignore[attr-defined]
        return self


def inspect_config_class() -> type[Section]:
    """`data` (required), `model` and `tokenizer` (optional, typed); other recipe keys (a
    distillation `teacher:` among them): any value."""
    others: dict[str, Any] = {
        name: (Any, None) for name in sorted(recipe_sections() - {"data", "model", "tokenizer"})
    }
    return create_model(
        "DataInspectConfig",
        __base__=_InspectBase,
        data=(DataConfig, ...),
        model=(StudentModelConfig | None, None),  # a path, or (distillation) init_from: the teacher's
        tokenizer=(str | None, None),
        **others,
    )
