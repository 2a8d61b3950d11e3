"""`DistillConfig`: knowledge distillation (`posttrain distill CONFIG`).

The common recipe sections (`data:` holds conversations, like SFT: the trained assistant tokens
are where the teacher is matched), plus:

    teacher:   the frozen teacher (a FrozenModelConfig with a path, and where it runs); same
               tokenizer as the student
    distill:   the divergence, its temperature and beta, its weight against the CE on the labels,
               and where the teacher's distribution comes from (live, or a top-k table)
    model.init_from: {teacher: true, layers: [...]}  a student made of some of the teacher's layers
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from posttrain.config.base import FieldError, Section
from posttrain.config.model import FrozenModelConfig, ModelConfig, check_model_path
from posttrain.config.recipe import RecipeConfig, check_position_limit


class StudentInitConfig(Section):
    """Build the student from the teacher: its embeddings, final norm, head and these layers."""

    teacher: Literal[True] = True
    layers: list[int] = Field(min_length=1)
    """Teacher layer indices the student keeps, strictly increasing (e.g. [0, 2, 4, ...])."""


class StudentModelConfig(ModelConfig):
    path: str | None = None  # type: ignore[assignment]
    """The student's HF directory or bundled name; leave it out with `init_from`."""

    init_from: StudentInitConfig | None = None
    """Make the student from the teacher's layers (written once to `<run_dir>/student_init`)."""

    @field_validator("path")
    @classmethod
    def _check_path(cls, value: str | None) -> str | None:  # overrides ModelConfig's: may be null
        return None if value is None else check_model_path(value)

    @model_validator(mode="after")
    def _check_source(self) -> StudentModelConfig:
        if (self.path is None) == (self.init_from is None):
            raise FieldError("path", "give the student as model.path or as model.init_from (from the "
                             "teacher's layers), exactly one of them")
        return self


class TeacherConfig(FrozenModelConfig):
    """The distillation teacher: a frozen model, in the student's processes or beside them."""

    placement: Literal["colocated", "separate"] = "colocated"
    """colocated: the teacher runs in each student rank's process (sharded like the student unless
    `shard: false`); separate: each rank's teacher is a whole copy in a Ray actor with `cpus` CPUs of
    its own (launcher.backend: ray), for a teacher that does not fit beside the student. Its final
    hidden states come back as tensors over a two-process gloo group; its head is sent once."""

    cpus: float = Field(1.0, gt=0)
    """`placement: separate` only: CPUs Ray reserves for each teacher actor; its torch threads are
    the whole part of it, at least 1."""

    timeout_s: float = Field(600.0, gt=0)
    """`placement: separate` only: how long a rank waits for the actor to connect and for each
    answer (the actor itself waits for its next request without a limit)."""


class DistillSection(Section):
    """The distillation loss and the teacher's signal."""

    loss: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    """forward_kl: KL(teacher || student), mass-covering; reverse_kl: KL(student || teacher),
    mode-seeking; jsd: generalised Jensen-Shannon with mixture beta * teacher + (1 - beta) * student."""

    beta: float = Field(0.5, gt=0, lt=1)
    """JSD's mixture weight (only read by loss: jsd)."""

    temperature: float = Field(1.0, gt=0)
    """Both distributions are taken at logits / T; the divergence is multiplied by T^2."""

    kd_weight: float = Field(1.0, ge=0, le=1)
    """loss = kd_weight * divergence + (1 - kd_weight) * cross-entropy on the data's labels."""

    teacher_signal: Literal["live", "topk"] = "live"
    """live: the teacher runs a forward pass per micro-batch; topk: one no-grad pass first stores the
    teacher's top-k log-probs per trained token in the run directory, and training needs no teacher."""

    topk: int = Field(64, ge=1)
    """k of teacher_signal: topk."""


class DistillConfig(RecipeConfig):
    """Knowledge distillation from a frozen teacher into a student that shares its tokenizer."""

    # Where the teacher runs changes no result: a colocated run short of memory resumes as separate.
    RESUME_MUTABLE: ClassVar[tuple[str, ...]] = RecipeConfig.RESUME_MUTABLE + (
        "teacher.placement", "teacher.cpus", "teacher.timeout_s")

    model: StudentModelConfig  # type: ignore[assignment]
    teacher: TeacherConfig
    distill: DistillSection = Field(default_factory=DistillSection)

    @model_validator(mode="after")
    def _check_distill(self) -> DistillConfig:
        if self.data.task != "sft":
            raise FieldError("data.task", f"{self.data.task!r}: distillation matches the teacher on the "
                             "assistant tokens of conversations; set data.task: sft")
        if self.teacher.path is None:
            raise FieldError("teacher.path", "distillation needs a teacher; set teacher.path")
        check_position_limit(self.teacher.path, self.data.max_length)
        if self.teacher.placement == "separate" and self.launcher.backend != "ray":
            raise FieldError("teacher.placement", "separate places the teacher on Ray actors of its own; "
                             "set launcher.backend: ray (or placement: colocated)")
        if self.teacher.placement == "separate" and self.launcher.gpus_per_worker > 0:
            raise FieldError("teacher.placement", "separate runs the teacher on CPUs and sends its hidden "
                             "states over gloo; a GPU teacher actor is not built yet (use placement: colocated)")
        return self
