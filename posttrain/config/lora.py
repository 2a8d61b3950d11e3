"""`LoraConfig`: low-rank adapters on chosen linear layers, the base model frozen."""

from __future__ import annotations

import fnmatch

from pydantic import Field, field_validator

from posttrain.config.base import Section


def matches_any(name: str, patterns: list[str]) -> bool:
    """fnmatch `patterns` against a qualified module name or its last component."""
    leaf = name.rsplit(".", 1)[-1]
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(leaf, p) for p in patterns)


class LoraConfig(Section):
    enabled: bool = False
    rank: int = Field(default=16, ge=1)
    alpha: float = Field(default=32.0, gt=0)
    """Adapter output is scaled by `alpha / rank`."""

    dropout: float = Field(default=0.0, ge=0, lt=1)
    target_modules: list[str] = Field(
        default_factory=lambda: ["wq", "wk", "wv", "wo", "w1", "w2", "w3"],
        min_length=1,
    )
    """fnmatch patterns over our linear-layer names (qualified name or last component); the
    default is every attention and MLP projection (`wq wk wv wo`, `w1` gate, `w3` up, `w2` down)."""

    trainable_modules: list[str] = Field(default_factory=list)
    """Patterns of modules trained in full beside the adapters, e.g. `tok_embeddings`, `output`."""

    @field_validator("target_modules", "trainable_modules")
    @classmethod
    def _non_empty_patterns(cls, patterns: list[str]) -> list[str]:
        for i, pattern in enumerate(patterns):
            if not pattern.strip():
                raise ValueError(f"entry {i} is an empty pattern")
        return patterns

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def is_target(self, module_name: str) -> bool:
        return matches_any(module_name, self.target_modules)

    def is_trainable(self, module_name: str) -> bool:
        return matches_any(module_name, self.trainable_modules)
