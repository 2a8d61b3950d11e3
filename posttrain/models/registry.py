"""Model families by name and by Hugging Face `model_type`.

This is the only place that knows which `model_type` belongs to which family; everything else asks
`spec_for_model_type` / `get_spec` and works with the returned `ModelSpec`.
"""

from __future__ import annotations

from posttrain.models import gemma3, llama, qwen2, qwen3
from posttrain.models.common.spec import ModelSpec

FAMILIES: dict[str, ModelSpec] = {
    spec.family: spec for spec in (llama.SPEC, qwen2.SPEC, qwen3.SPEC, gemma3.SPEC)
}
_BY_MODEL_TYPE: dict[str, ModelSpec] = {
    model_type: spec for spec in FAMILIES.values() for model_type in spec.model_types
}


def supported_model_types() -> list[str]:
    return sorted(_BY_MODEL_TYPE)


def get_spec(family: str) -> ModelSpec:
    """The spec of a family by its name (`llama`, `qwen2`, `qwen3`, `gemma3`)."""
    if family not in FAMILIES:
        raise ValueError(
            f"unknown model family {family!r}; supported families: {', '.join(sorted(FAMILIES))}"
        )
    return FAMILIES[family]


def spec_for_model_type(model_type: str | None) -> ModelSpec:
    """The spec that handles a config.json `model_type`."""
    if model_type not in _BY_MODEL_TYPE:
        raise ValueError(
            f"unsupported model_type {model_type!r} in config.json; supported model types: "
            f"{', '.join(supported_model_types())}"
        )
    return _BY_MODEL_TYPE[model_type]
