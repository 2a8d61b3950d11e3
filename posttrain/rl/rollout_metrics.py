"""A rollout's metrics: rewards per component, response lengths, filtering, time per phase.

Sums, sums of squares and maxima are collected on each rank and reduced over the data-parallel
ranks once per rollout (two all-reduces), so every number is global:

    reward/mean, reward/std              the total (weighted, with the overlong penalty)
    reward/<name>/mean|std, reward/<name>/<key>   each reward and the values it reports beside it
                                         (`reward/addition/correct` is the accuracy)
    reward/errors                        samples x rewards scored 0 after a failure
    response/length_mean|max, response/truncated_share   generated tokens; cut by max_new_tokens
    rollout/samples, rollout/groups, rollout/dropped_groups, rollout/filtered_samples
    rollout/tokens_per_s                 generated tokens per second of generation (summed over ranks)
    rollout/policy_version               the weights the rollout was generated with
    rollout/engine_restarts              engine processes restarted so far (this rank; rollout.process)
    teacher/reverse_kl                   on-policy distillation: mean over sampled tokens of
                                         log p_engine - log p_teacher (a k1 estimate per token)
    time/<phase>_s                       sync, generate, reward, teacher, old_logprobs, rollout (max over ranks)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from posttrain.rl.rewards.workers import RewardScores
from posttrain.rollout.engine import RolloutBatch


@dataclass
class RolloutStats:
    sums: dict[str, float] = field(default_factory=dict)
    maxima: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    groups: int = 0
    dropped_groups: int = 0
    filtered_samples: int = 0
    engine_restarts: int = 0  # the controller's running count
    version: int = 0

    def _add(self, name: str, value: float) -> None:
        self.sums[name] = self.sums.get(name, 0.0) + float(value)

    def _moments(self, name: str, values: torch.Tensor) -> None:
        self._add(f"{name}:sum", values.sum())
        self._add(f"{name}:sq", (values.double() ** 2).sum())

    def add_teacher_gap(self, total: float, tokens: int) -> None:
        """A sample's sum of (log p_engine - log p_teacher) over its `tokens` sampled tokens."""
        self._add("teacher_gap", total)
        self._add("teacher_tokens", tokens)

    def add_rollout(self, batch: RolloutBatch, scores: RewardScores, rewards: torch.Tensor, version: int) -> None:
        self.version = version
        count = len(batch)
        self.groups += len(set(batch.prompt_index.tolist()))
        self._add("samples", count)
        self._moments("reward", rewards)
        for name, values in scores.values.items():
            self._moments(f"reward/{name}", values)
        self._add("reward/errors", scores.errors)
        self.seconds["reward"] = self.seconds.get("reward", 0.0) + scores.seconds
        lengths = batch.lengths.double()
        self._add("tokens", lengths.sum())
        self._add("truncated", sum(r == "length" for r in batch.finish_reasons))
        self.maxima["response/length_max"] = max(self.maxima.get("response/length_max", 0.0),
                                                 float(lengths.max()) if count else 0.0)

    def reduce(self, group: dist.ProcessGroup | None, device: torch.device) -> dict[str, float]:
        """Global metrics (a collective over `group` when there are several ranks)."""
        self._add("groups", self.groups)
        self._add("dropped_groups", self.dropped_groups)
        self._add("filtered_samples", self.filtered_samples)
        for phase, seconds in self.seconds.items():
            self.maxima[f"time/{phase}_s"] = seconds
        names, peaks = sorted(self.sums), sorted(self.maxima)
        sums = torch.tensor([self.sums[n] for n in names], dtype=torch.float64, device=device)
        tops = torch.tensor([self.maxima[n] for n in peaks], dtype=torch.float64, device=device)
        rate = self.sums.get("tokens", 0.0) / max(self.seconds.get("generate", 0.0), 1e-9)
        rates = torch.tensor([rate], dtype=torch.float64, device=device)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
            dist.all_reduce(sums, group=group)
            dist.all_reduce(rates, group=group)
            dist.all_reduce(tops, op=dist.ReduceOp.MAX, group=group)
        total = dict(zip(names, sums.tolist()))
        out = dict(zip(peaks, tops.tolist()))
        out.update(_means(total))
        out["rollout/tokens_per_s"] = float(rates[0])
        out["rollout/policy_version"] = float(self.version)
        out["rollout/engine_restarts"] = float(self.engine_restarts)
        return out


def _means(total: dict[str, float]) -> dict[str, float]:
    samples = total.get("samples", 0.0)
    out = {
        "rollout/samples": samples,
        "rollout/groups": total.get("groups", 0.0),
        "rollout/dropped_groups": total.get("dropped_groups", 0.0),
        "rollout/filtered_samples": total.get("filtered_samples", 0.0),
        "reward/errors": total.get("reward/errors", 0.0),
    }
    if not samples:
        return out
    if total.get("teacher_tokens"):
        out["teacher/reverse_kl"] = total["teacher_gap"] / total["teacher_tokens"]
    out["response/length_mean"] = total["tokens"] / samples
    out["response/truncated_share"] = total["truncated"] / samples
    for key in total:
        if key.endswith(":sum"):
            name = key[: -len(":sum")]
            mean = total[key] / samples
            var = max(total[f"{name}:sq"] / samples - mean * mean, 0.0)
            out[f"{name}/mean" if name.count("/") <= 1 else name] = mean
            if name.count("/") <= 1:
                out[f"{name}/std"] = var ** 0.5
    return out
