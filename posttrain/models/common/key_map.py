"""State-dict key translation between our names and a Hugging Face checkpoint's, both ways."""

from __future__ import annotations

import re
from dataclasses import dataclass, field


@dataclass(frozen=True)
class KeyMap:
    """Pairs of `(ours, hf)` key templates; `{i}` stands for the layer index.

    `ignored_hf` holds regexes of checkpoint keys that carry nothing we need (for example stored
    RoPE frequencies) and are skipped on load.
    """

    pairs: tuple[tuple[str, str], ...]
    ignored_hf: tuple[str, ...] = ()
    _to_hf: dict = field(init=False, repr=False, compare=False)
    _from_hf: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_to_hf", _compile(self.pairs))
        object.__setattr__(self, "_from_hf", _compile(tuple((hf, ours) for ours, hf in self.pairs)))

    def to_hf(self, key: str) -> str:
        return _translate(self._to_hf, key, "our")

    def from_hf(self, key: str) -> str | None:
        """Our name for checkpoint key `key`, or None when the key is ignorable."""
        if any(re.fullmatch(pattern, key) for pattern in self.ignored_hf):
            return None
        return _translate(self._from_hf, key, "checkpoint")


def _compile(pairs: tuple[tuple[str, str], ...]) -> dict:
    table = {}
    for source, target in pairs:
        pattern = re.escape(source).replace(r"\{i\}", r"(\d+)")
        table[re.compile(pattern + "$")] = target
    return table


def _translate(table: dict, key: str, side: str) -> str:
    for pattern, target in table.items():
        match = pattern.match(key)
        if match:
            return target.replace("{i}", match.group(1)) if match.groups() else target
    raise KeyError(f"no mapping for {side} parameter {key!r}")


def decoder_key_pairs(extra: tuple[tuple[str, str], ...] = ()) -> tuple[tuple[str, str], ...]:
    """The key pairs every Llama-style checkpoint shares (`model.` prefix, `lm_head`)."""
    base = (
        ("tok_embeddings.weight", "model.embed_tokens.weight"),
        ("norm.weight", "model.norm.weight"),
        ("output.weight", "lm_head.weight"),
        ("layers.{i}.attention_norm.weight", "model.layers.{i}.input_layernorm.weight"),
        ("layers.{i}.feed_forward.w1.weight", "model.layers.{i}.mlp.gate_proj.weight"),
        ("layers.{i}.feed_forward.w3.weight", "model.layers.{i}.mlp.up_proj.weight"),
        ("layers.{i}.feed_forward.w2.weight", "model.layers.{i}.mlp.down_proj.weight"),
        ("layers.{i}.feed_forward.w1.bias", "model.layers.{i}.mlp.gate_proj.bias"),
        ("layers.{i}.feed_forward.w3.bias", "model.layers.{i}.mlp.up_proj.bias"),
        ("layers.{i}.feed_forward.w2.bias", "model.layers.{i}.mlp.down_proj.bias"),
    )
    attention = tuple(
        (f"layers.{{i}}.attention.w{ours}.{kind}", f"model.layers.{{i}}.self_attn.{hf}_proj.{kind}")
        for ours, hf in (("q", "q"), ("k", "k"), ("v", "v"), ("o", "o"))
        for kind in ("weight", "bias")
    )
    return base + attention + extra
