"""Model roles: the one factory for the trainable policy and for frozen models.

    policy = build_trainable(cfg.model, cfg.lora, cfg.parallel, model_dir=..., device=..., mesh=..., seed=...)
    reference = build_reference(cfg.reference, policy, lora=cfg.lora.enabled, policy_dir=..., ...)
    with reference.active() as ref_model:      # no grad, eval mode, (adapters off)
        hidden = ref_model(...)

The *trainable* role gets LoRA, activation checkpointing, compile and FSDP2/TP as configured. A
*frozen* role (DPO/RL reference, distillation teacher) is loaded in its own dtype with every
parameter frozen, in eval mode, without activation checkpointing or compile, and on a mesh is
sharded like the policy unless `shard: false`. A LoRA policy's reference is the policy itself with
its adapters switched off, not a second copy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh

from posttrain.config import FrozenModelConfig, LoraConfig, ModelConfig
from posttrain.config.parallel import MixedPrecisionConfig, ParallelConfig
from posttrain.models import hub
from posttrain.models.hf import build_meta_model, load_hf, read_hf_config
from posttrain.models.lora import adapters_disabled, apply_lora
from posttrain.parallel.checkpointing import apply_activation_checkpointing
from posttrain.parallel.compile import apply_compile
from posttrain.parallel.fsdp import reshard
from posttrain.parallel.load import init_lora_adapters, load_sharded, lora_initializer
from posttrain.parallel.parallelize import parallelize_model
from posttrain.train.objectives import check_supported

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def resolve_model_dir(path: str) -> Path:
    """A bundled model name is imported (once, cached); anything else is an HF directory."""
    return hub.import_model(path) if path in hub.BUNDLED else Path(path).expanduser()


def load_tokenizer(model_dir: Path, trust_remote_code: bool):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)


def check_shared_tokenizer(student, teacher, *, student_name: str, teacher_name: str) -> None:
    """A teacher must map every token to the same id as the student (special tokens and the chat
    template included); raises `ValueError` naming the first token that differs."""
    mine, theirs = student.get_vocab(), teacher.get_vocab()
    for token, index in sorted(mine.items(), key=lambda item: item[1]):
        if theirs.get(token) != index:
            where = "lacks it" if token not in theirs else f"has it as id {theirs[token]}"
            raise ValueError(f"tokenizers differ: {student_name} has {token!r} as id {index}, {teacher_name} "
                             f"{where}; the teacher must share the student's tokenizer")
    extra = sorted((index, token) for token, index in theirs.items() if token not in mine)
    if extra:
        index, token = extra[0]
        raise ValueError(f"tokenizers differ: {teacher_name} has {token!r} as id {index}, {student_name} lacks it")
    for attribute in ("bos_token_id", "eos_token_id", "pad_token_id", "chat_template"):
        if getattr(student, attribute, None) != getattr(teacher, attribute, None):
            raise ValueError(f"tokenizers differ in {attribute}: {student_name} "
                             f"{getattr(student, attribute, None)!r}, {teacher_name} {getattr(teacher, attribute, None)!r}")


def build_trainable(
    model_cfg: ModelConfig,
    lora_cfg: LoraConfig,
    parallel_cfg: ParallelConfig,
    *,
    model_dir: Path,
    device: torch.device,
    mesh: DeviceMesh | None,
    seed: int,
) -> nn.Module:
    """Load, adapt (LoRA), then apply TP, activation checkpointing, compile and FSDP, in that order.

    Without a mesh the model is loaded whole on `device`. With one it is built on `meta`,
    parallelised, and each rank reads only its own slices of the checkpoint. LoRA adapters are
    drawn from `seed` the same way at every world size.
    """
    dtype = DTYPES[model_cfg.dtype]
    if mesh is None:
        model = load_hf(model_dir, device=device, dtype=dtype, attention_backend=model_cfg.attention)
    else:
        source, args = read_hf_config(model_dir)
        model = build_meta_model(args, model_cfg.attention).to(dtype)
    check_supported(model)
    if lora_cfg.enabled:
        apply_lora(model, rank=lora_cfg.rank, alpha=lora_cfg.alpha, dropout=lora_cfg.dropout,
                   target_modules=lora_cfg.target_modules, trainable_modules=lora_cfg.trainable_modules)
    if mesh is not None:
        parallelize_model(model, mesh, parallel_cfg, activation_checkpointing=model_cfg.activation_checkpointing,
                          compile=model_cfg.compile)
        init = lora_initializer(model, seed) if lora_cfg.enabled else None
        return load_sharded(model, source, device, init_missing=init)
    if lora_cfg.enabled:
        init_lora_adapters(model, seed)  # the same adapters at every world size
    if model_cfg.activation_checkpointing:
        apply_activation_checkpointing(model)
    if model_cfg.compile:
        apply_compile(model)
    return model


@dataclass
class FrozenModel:
    """A model run without gradients; `active()` yields it ready for a forward pass."""

    model: nn.Module
    view: Callable[[nn.Module], AbstractContextManager] = field(default=lambda m: nullcontext(m))
    is_policy_view: bool = False  # True: the policy itself with its adapters off

    @contextmanager
    def active(self) -> Iterator[nn.Module]:
        """No gradients, eval mode, the role's view (adapters off for a LoRA policy's reference);
        a sharded frozen model is put back in its sharded state afterwards."""
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), self.view(self.model) as model:
                yield model
        finally:
            self.model.train(was_training)
            if not self.is_policy_view:
                reshard(self.model)

    def close(self) -> None:
        """Nothing outside this process to release (a `RemoteTeacher` has its process to end)."""


def build_frozen(
    role: FrozenModelConfig,
    *,
    model_dir: Path,
    device: torch.device,
    mesh: DeviceMesh | None = None,
    parallel_cfg: ParallelConfig | None = None,
) -> FrozenModel:
    """Load `model_dir` as a frozen role: its own dtype, no grad, eval mode, no AC or compile.

    On a mesh with `role.shard` it is sharded like the policy (TP plan and FSDP2, without a
    mixed-precision cast: it computes in its own dtype); otherwise each rank holds a whole copy.
    """
    dtype = DTYPES[role.dtype]
    if mesh is None or not role.shard:
        model = load_hf(model_dir, device=device, dtype=dtype, attention_backend=role.attention)
    else:
        source, args = read_hf_config(model_dir)
        model = build_meta_model(args, role.attention).to(dtype)
        plain = (parallel_cfg or ParallelConfig()).model_copy(update={"mixed_precision": MixedPrecisionConfig()})
        parallelize_model(model, mesh, plain)
        model = load_sharded(model, source, device)
    check_supported(model)
    model.requires_grad_(False)
    model.eval()
    return FrozenModel(model)


def build_teacher(
    role: FrozenModelConfig,
    *,
    student_tokenizer,
    student_dir: Path,
    device: torch.device,
    mesh: DeviceMesh | None = None,
    parallel_cfg: ParallelConfig | None = None,
) -> FrozenModel:
    """A distillation teacher: its tokenizer checked against the student's before its weights load."""
    assert role.path is not None, "a teacher has a path (the configs check it)"
    teacher_dir = resolve_model_dir(role.path)
    check_shared_tokenizer(student_tokenizer, load_tokenizer(teacher_dir, role.trust_remote_code),
                           student_name=str(student_dir), teacher_name=str(teacher_dir))
    return build_frozen(role, model_dir=teacher_dir, device=device, mesh=mesh, parallel_cfg=parallel_cfg)


def build_reference(
    role: FrozenModelConfig,
    policy: nn.Module,
    *,
    lora: bool,
    policy_dir: Path,
    device: torch.device,
    mesh: DeviceMesh | None = None,
    parallel_cfg: ParallelConfig | None = None,
) -> FrozenModel:
    """The reference of a policy: with LoRA and the policy's own checkpoint (`path: null` or the
    same directory), the policy with its adapters switched off; otherwise a frozen copy."""
    model_dir = policy_dir if role.path is None else resolve_model_dir(role.path)
    same_weights = model_dir.resolve() == policy_dir.resolve()
    if lora and same_weights:
        return FrozenModel(policy, view=adapters_disabled, is_policy_view=True)
    return build_frozen(role, model_dir=model_dir, device=device, mesh=mesh, parallel_cfg=parallel_cfg)
