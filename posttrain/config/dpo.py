"""`DPOConfig`: preference optimisation (`posttrain dpo CONFIG`).

The common recipe sections, the `dpo:` section (loss, its options, where reference log-probs come
from) and `reference_model:` (the frozen role that computes them; by default the policy's own
starting checkpoint, which under LoRA is the policy with its adapters off).
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from posttrain.config.base import FieldError, Section
from posttrain.config.model import FrozenModelConfig
from posttrain.config.recipe import RecipeConfig

PREFERENCE_LOSSES = ("sigmoid", "robust", "hinge", "ipo", "simpo")
REFERENCE_FREE_LOSSES = ("simpo",)


class DPOSection(Section):
    """The preference loss and where its reference log-probs come from."""

    loss: Literal["sigmoid", "robust", "hinge", "ipo", "simpo"] = "sigmoid"
    """sigmoid: DPO; robust: DPO unbiased under label noise; hinge: SLiC; ipo: IPO (length-normalised
    log-ratios); simpo: SimPO (reference-free, length-normalised, target margin `gamma`)."""

    beta: float = Field(0.1, gt=0)
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    """The assumed share of flipped labels (sigmoid: conservative DPO; robust; simpo)."""

    gamma: float = Field(0.5, ge=0)
    """SimPO's target reward margin."""

    sft_weight: float = Field(0.0, ge=0)
    """Weight of the chosen replies' cross-entropy added to the loss (RPO-style); 0: none."""

    reference: Literal["precompute", "live", "none"] = "precompute"
    """precompute: one no-grad pass over the data before training stores every pair's reference
    log-probs in the run directory (reused by a rerun); live: the frozen reference runs beside the
    policy on every micro-batch; none: reference-free losses (simpo)."""

    @model_validator(mode="after")
    def _check(self) -> DPOSection:
        free = self.loss in REFERENCE_FREE_LOSSES
        if free and self.reference != "none":
            raise FieldError("reference", f"loss {self.loss} is reference-free; set dpo.reference: none")
        if not free and self.reference == "none":
            raise FieldError("reference", f"loss {self.loss} needs reference log-probs: precompute or live")
        if self.label_smoothing and self.loss in ("hinge", "ipo"):
            raise FieldError("label_smoothing", f"loss {self.loss} takes no label smoothing")
        return self


class DPOConfig(RecipeConfig):
    """Preference optimisation over chosen/rejected pairs (`data.task: preference`)."""

    RESUME_MUTABLE: ClassVar[tuple[str, ...]] = RecipeConfig.RESUME_MUTABLE

    dpo: DPOSection = Field(default_factory=DPOSection)
    reference_model: FrozenModelConfig = Field(default_factory=FrozenModelConfig)

    @model_validator(mode="after")
    def _check_task(self) -> DPOConfig:
        if self.data.task != "preference":
            raise FieldError("data.task", f"{self.data.task!r}: preference optimisation reads chosen/rejected "
                             "pairs; set data.task: preference")
        if self.eval.scorer:
            raise FieldError("eval.scorer", "scored generation is an SFT evaluation; a DPO run evaluates "
                             "held-out pairs (preference accuracy and margins)")
        return self
