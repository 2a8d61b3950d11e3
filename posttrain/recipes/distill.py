"""Knowledge distillation: `posttrain distill CONFIG [key=value ...]`.

The student is `model.path`, or made once from the teacher's layers (`model.init_from`) into
`<run_dir>/student_init`, an ordinary HF directory. Teacher and student tokenizers are compared
before any weight loads. The objective (`train/distill.py`) matches the teacher on the trained
tokens of SFT data, with the teacher live or from a top-k table computed by one pass before
training (`train/teacher_cache.py`); with `teacher.placement: separate` the teacher runs in a Ray
actor per rank (`teacher_actor.py`), for the live signal and the top-k pass alike. Data, held-out
metrics (the objective's: divergence, CE, teacher CE, agreement) and scored generation are SFT's
(`PackedDataRecipe`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch.distributed as dist

from posttrain.cluster.dist_env import DistEnv
from posttrain.config.distill import DistillConfig
from posttrain.models.layer_drop import init_student
from posttrain.ops.distill import DistillLoss
from posttrain.recipes.common import PackedDataRecipe
from posttrain.train.distill import DistillationObjective
from posttrain.train.frozen_pass import fingerprint_inputs, stream_configs
from posttrain.train.objective import Objective
from posttrain.train.remote_teacher import RemoteTeacher
from posttrain.train.roles import FrozenModel, build_frozen, check_shared_tokenizer, load_tokenizer, resolve_model_dir
from posttrain.train.teacher_cache import TopKPass, TopKTable
from posttrain.train.trainer import TrainContext, TrainResult, train

logger = logging.getLogger("posttrain.distill")
STUDENT_DIR = "student_init"


class DistillRecipe(PackedDataRecipe):
    cfg: DistillConfig

    def objective(self, ctx: TrainContext) -> Objective:
        d = self.cfg.distill
        loss = DistillLoss(d.loss, d.beta, d.temperature, d.kd_weight)
        chunks = {"chunk_size": self.cfg.train.chunk_size, "vocab_chunk_size": self.cfg.train.vocab_chunk_size}
        if d.teacher_signal == "topk":
            return DistillationObjective(loss, table=self._topk_table(ctx), **chunks)
        return DistillationObjective(loss, teacher=self._teacher(ctx), **chunks)  # tokenizers compared in with_student

    def _teacher(self, ctx: TrainContext) -> FrozenModel | RemoteTeacher:
        """The teacher in this rank's process, or with `placement: separate` in an actor of its own."""
        cfg = self.cfg
        teacher_dir = resolve_model_dir(cfg.teacher.path)
        if cfg.teacher.placement == "separate":
            from posttrain.recipes.teacher_actor import start_teacher  # imports Ray

            return start_teacher(cfg.teacher, teacher_dir, device=ctx.env.device, precision=cfg.train.precision)
        return build_frozen(cfg.teacher, model_dir=teacher_dir, device=ctx.env.device, mesh=ctx.mesh,
                            parallel_cfg=cfg.parallel)

    def _topk_table(self, ctx: TrainContext) -> TopKTable:
        cfg, d = self.cfg, self.cfg.distill
        teacher_dir = resolve_model_dir(cfg.teacher.path)
        inputs = fingerprint_inputs(cfg.data, cfg.eval.sources, tokenizer_dir=ctx.model_dir,
                                    reference_dir=teacher_dir, reference_dtype=cfg.teacher.dtype,
                                    precision=cfg.train.precision)
        inputs["topk"] = {"k": d.topk, "temperature": d.temperature}
        cache = TopKPass(cfg.run_dir, inputs, rank=ctx.env.rank, device=ctx.env.device, stop=ctx.stop)
        if not cache.complete:
            if ctx.env.is_main:
                logger.info("teacher top-%d: one pass over the data into %s", d.topk, cache.directory)
            score = cache.score_fn(k=d.topk, temperature=d.temperature, chunk_size=cfg.train.chunk_size,
                                   vocab_chunk_size=cfg.train.vocab_chunk_size)
            cache.run(list(stream_configs(cfg.data, cfg.eval.sources)), lambda: self._teacher(ctx), score,
                      tokenizer=ctx.tokenizer, batch_size=cfg.train.micro_batch_size, dp_rank=ctx.dp.rank,
                      dp_size=ctx.dp.size, precision=cfg.train.precision)
        table = cache.table()
        if ctx.env.is_main:
            logger.info("teacher top-%d: %d documents in %s", d.topk, len(table), cache.directory)
        return table


def with_student(cfg: DistillConfig, env: DistEnv | None) -> DistillConfig:
    """The config with `model.path` set to the student (made from the teacher first with
    `init_from`), after checking that the teacher shares the student's tokenizer."""
    teacher_dir = resolve_model_dir(cfg.teacher.path)
    if cfg.model.init_from is not None:
        student_dir = Path(cfg.run_dir) / STUDENT_DIR
        main = env.is_main if env is not None else not dist.is_initialized() or dist.get_rank() == 0
        if main:
            init_student(teacher_dir, cfg.model.init_from.layers, student_dir)
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"path": str(student_dir)})})
    student_dir = resolve_model_dir(cfg.model.path)
    check_shared_tokenizer(load_tokenizer(student_dir, cfg.model.trust_remote_code),
                           load_tokenizer(teacher_dir, cfg.teacher.trust_remote_code),
                           student_name=str(student_dir), teacher_name=str(teacher_dir))
    return cfg


def run_distill(cfg: DistillConfig, env: DistEnv | None = None, attempt: int = 0) -> TrainResult:
    """Train as configured on this rank; resumes from the newest checkpoint when asked."""
    return train(DistillRecipe(with_student(cfg, env)), env, attempt)
