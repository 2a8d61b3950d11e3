"""The shared trainer runs an objective it has never seen, with no loop code of its own, and the
model roles (trainable, frozen, LoRA policy with adapters off) behave as their contract says."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from posttrain.config import FrozenModelConfig, SFTConfig, load_config
from posttrain.data.batch import IGNORE_INDEX, PackedBatch
from posttrain.evaluation.held_out import HeldOutEvaluator, held_out_batches
from posttrain.models.hf import load_hf
from posttrain.models.lora import LoRALinear, apply_lora
from posttrain.ops import linear_cross_entropy, linear_logprobs
from posttrain.recipes.sft import SFTRecipe
from posttrain.train.objective import Objective, ObjectiveOutput
from posttrain.train.objectives import forward_hidden
from posttrain.train.roles import FrozenModel, build_frozen, build_reference
from posttrain.train.trainer import TrainContext, train
from tests.integration.sft_configs import write_config


# ------------------------------------------------------------------------------------ a toy objective


class WeightedCE(Objective):
    """Cross-entropy weighted per token by the `token_weight` field; `prepare` writes the frozen
    reference's log-probs of the labels, and the objective reports how far the policy has moved
    from them (mean log-prob gain per trained token)."""

    name = "weighted_ce"
    required_fields = frozenset({"token_weight", "ref_logprobs"})

    def __init__(self, reference: FrozenModel):
        self.reference = reference

    def prepare(self, batch: PackedBatch) -> PackedBatch:
        with self.reference.active() as ref:
            hidden = forward_hidden(ref, batch)
            ref_lp = linear_logprobs(hidden, ref.head_weight, batch.labels, vocab_size=ref.vocab_size)
        return batch.with_fields(ref_logprobs=ref_lp)

    def compute(self, model, batch: PackedBatch, normaliser: int) -> ObjectiveOutput:
        hidden = forward_hidden(model, batch)
        logprobs = linear_logprobs(hidden, model.head_weight, batch.labels, vocab_size=model.vocab_size)
        trained = batch.labels != IGNORE_INDEX
        loss = -(logprobs * batch.fields["token_weight"])[trained].sum() / normaliser
        gain = (logprobs.detach() - batch.fields["ref_logprobs"])[trained].sum()
        return ObjectiveOutput(loss, {"toy/logprob_gain": (gain, int(trained.sum()))})


class WeightedRecipe(SFTRecipe):
    """SFT's data and evaluators, a different objective, and a field added to every batch."""

    def objective(self, ctx: TrainContext) -> Objective:
        reference = build_reference(FrozenModelConfig(), ctx.model, lora=self.cfg.lora.enabled,
                                    policy_dir=ctx.model_dir, device=ctx.env.device)
        return WeightedCE(reference)

    def loader(self, ctx: TrainContext, *, counting: bool = False):
        return _WithWeights(super().loader(ctx, counting=counting))

    def evaluators(self, ctx: TrainContext, objective: Objective):
        if not self.cfg.eval.enabled:
            return []
        held_out = held_out_batches(self.cfg.data, self.cfg.eval.sources, ctx.tokenizer, batch_size=2, rank=0,
                                    world_size=1, max_samples=None)
        return [HeldOutEvaluator([with_weights(b) for b in held_out], objective, precision="fp32",
                                 device=ctx.env.device, dp_group=None)]


def with_weights(batch: PackedBatch) -> PackedBatch:
    """`token_weight`: 2 on every trained token, 0 elsewhere."""
    return batch.with_fields(token_weight=(batch.labels != IGNORE_INDEX).float() * 2.0)


class _WithWeights:
    """A loader whose batches carry `token_weight`."""

    def __init__(self, loader):
        self.inner = loader

    def __iter__(self):
        for batch in self.inner:
            yield with_weights(batch)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_a_new_objective_runs_through_the_trainer(tiny_checkpoints, task_dir, tmp_path, lora):
    cfg_path = write_config(
        tmp_path / "cfg.yaml", tiny_checkpoints["llama"], task_dir, tmp_path,
        train={"steps": 4, "lr": 3e-3 if lora else 1e-3},
        lora={"enabled": lora, "rank": 4, "alpha": 8},
        eval={"sources": [{"path": str(task_dir / "held_out.jsonl"), "fields": {"question": "user", "answer": "assistant"}}]},
        checkpoint={"every_steps": 2, "resume": "auto"},
    )
    cfg = load_config(cfg_path, [], SFTConfig)
    result = train(WeightedRecipe(cfg))
    assert result.status == "finished" and result.steps == 4
    steps = [m for m in _metrics(Path(result.run_dir)) if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2, 3, 4]
    # Step 1 trains the policy as loaded: the reference's log-probs are its own, gain exactly 0.
    assert steps[0]["toy/logprob_gain"] == 0.0
    assert steps[-1]["toy/logprob_gain"] > 0.05  # the policy has moved towards the labels
    # The loss is twice the mean negative log-likelihood (weights of 2), as the objective says.
    assert steps[0]["loss"] == pytest.approx(2 * 5.83, rel=0.02)
    assert set(result.eval) == {"loss", "toy/logprob_gain"}  # held-out metrics through the same objective
    assert Path(result.export_dir, "model.safetensors").exists()

    resumed = train(WeightedRecipe(load_config(cfg_path, ["train.steps=6"], SFTConfig)))
    assert resumed.steps == 6 and len(resumed.losses) == 2  # continued from step_4


def test_missing_field_is_named_before_any_step(tiny_checkpoints, task_dir, tmp_path):
    class NoWeights(WeightedRecipe):
        def loader(self, ctx, *, counting=False):
            return SFTRecipe.loader(self, ctx, counting=counting)

    cfg = load_config(write_config(tmp_path / "cfg.yaml", tiny_checkpoints["llama"], task_dir, tmp_path), [],
                      SFTConfig)
    with pytest.raises(ValueError, match=r"objective 'weighted_ce' needs the batch field\(s\) \['token_weight'\]"):
        train(NoWeights(cfg))


# ------------------------------------------------------------------------------------ roles


def test_frozen_role_is_frozen_in_its_own_dtype(tiny_checkpoints):
    model_dir = tiny_checkpoints["qwen3"]
    frozen = build_frozen(FrozenModelConfig(dtype="bfloat16"), model_dir=model_dir, device=torch.device("cpu"))
    params = list(frozen.model.parameters())
    assert all(not p.requires_grad for p in params) and all(p.dtype == torch.bfloat16 for p in params)
    assert not frozen.model.training
    reference = load_hf(model_dir, dtype=torch.bfloat16)
    ids = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    with frozen.active() as model:
        hidden = model(ids)
        assert not hidden.requires_grad
    with torch.no_grad():
        assert torch.equal(hidden, reference(ids))


def test_lora_reference_is_the_policy_with_adapters_off(tiny_checkpoints):
    model_dir = tiny_checkpoints["llama"]
    policy = load_hf(model_dir)
    apply_lora(policy, rank=4, alpha=8, target_modules=["wq", "wv", "w1"])
    with torch.no_grad():
        for m in policy.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(0, 0.5)
    base = load_hf(model_dir)
    reference = build_reference(FrozenModelConfig(), policy, lora=True, policy_dir=model_dir,
                                device=torch.device("cpu"))
    assert reference.model is policy  # no second copy
    ids = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(1))
    policy.train()
    with torch.no_grad():
        adapted, plain = policy(ids), base(ids)
    with reference.active() as model:
        off = model(ids)
    assert torch.equal(off, plain)
    assert not torch.allclose(adapted, plain)
    assert policy.training  # the policy's mode is restored
    with torch.no_grad():
        assert torch.equal(policy(ids), adapted)  # and so are its adapters

    full = build_reference(FrozenModelConfig(), base, lora=False, policy_dir=model_dir, device=torch.device("cpu"))
    assert full.model is not base and not any(p.requires_grad for p in full.model.parameters())


def test_reference_loss_of_a_frozen_copy_matches_the_policy_at_start(tiny_checkpoints):
    """A frozen copy (full fine-tuning) gives the policy's own CE before any update."""
    model_dir = tiny_checkpoints["gemma3"]
    policy = load_hf(model_dir)
    reference = build_reference(FrozenModelConfig(), policy, lora=False, policy_dir=model_dir,
                                device=torch.device("cpu"))
    ids = torch.randint(0, 200, (1, 10), generator=torch.Generator().manual_seed(2))
    labels = torch.cat([ids[:, 1:], torch.full((1, 1), IGNORE_INDEX)], 1)
    with reference.active() as model:
        ref = linear_cross_entropy(model(ids), model.head_weight, labels, vocab_size=model.vocab_size)
    with torch.no_grad():
        mine = linear_cross_entropy(policy(ids), policy.head_weight, labels, vocab_size=policy.vocab_size)
    assert torch.equal(ref, mine)
