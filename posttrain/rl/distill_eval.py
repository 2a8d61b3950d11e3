"""Held-out metric of on-policy distillation: how far the policy's own answers are from the teacher.

The policy samples one answer per held-out prompt (fixed seed, the rollout's sampling); the policy
and the teacher then score those tokens, and `eval/teacher_reverse_kl` is the mean over them of
`log p_policy - log p_teacher` (a k1 estimate of the per-token KL(policy || teacher)). It runs on
every rank with the same prompts (its scoring passes are collective under FSDP).
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn as nn

from posttrain.data.batch import IGNORE_INDEX, Sample
from posttrain.models.generate import generate_from_ids
from posttrain.models.sampling import SamplingParams
from posttrain.rl.samples import rollout_sample
from posttrain.train.roles import FrozenModel

Scorer = Callable[[list[Sample], nn.Module, str, int], list[Sample]]  # RolloutController.score_tokens


class TeacherKLEvaluator:
    def __init__(self, prompt_ids: list[list[int]], tokenizer, teacher: FrozenModel, sampling: SamplingParams,
                 score: Scorer, seed: int = 0):
        self.prompt_ids, self.tokenizer, self.teacher = prompt_ids, tokenizer, teacher
        self.sampling, self.score, self.seed = sampling, score, seed

    def run(self, model: nn.Module, step: int) -> dict[str, float]:
        was_training = model.training
        model.eval()
        try:
            out = generate_from_ids(model, self.tokenizer, self.prompt_ids, self.sampling, n=1, seed=self.seed)
            samples = [rollout_sample(p, t, [0.0] * len(t), 0.0, group=i)
                       for i, (p, t) in enumerate(zip(out.prompt_ids, out.token_ids))]
            mine = self.score(samples, model, "policy", self.seed)
        finally:
            model.train(was_training)
        with self.teacher.active() as teacher:
            theirs = self.score(samples, teacher, "teacher", self.seed)
        gap = tokens = 0.0
        for a, b in zip(mine, theirs):
            for label, p, t in zip(a.labels, a.fields["policy"], b.fields["teacher"]):
                if label != IGNORE_INDEX:
                    gap += p - t
                    tokens += 1
        return {"teacher_reverse_kl": gap / tokens if tokens else float("nan")}
