"""`Section`: the pydantic base of every config component.

Every component (model, data, train, ...) is its own small model that rejects unknown keys and
validates assignments, so a typo or a bad value fails at load time with its key path.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """Base of every config component: unknown keys are errors; assignments are re-validated."""

    model_config = ConfigDict(
        extra="forbid",
        validate_assignment=True,
        validate_default=True,
        use_attribute_docstrings=True,
    )


class FieldError(ValueError):
    """A failed cross-field check, naming the field it is about.

    Raise it from a section's model validator: `field` is relative to that section (e.g.
    `"warmup_steps"` inside `TrainConfig`) and the loader prefixes the section's own path, so the
    user reads `train.warmup_steps: ...`.
    """

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field
