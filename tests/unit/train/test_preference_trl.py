"""Parity of the preference objective (`posttrain.train.preference`) with TRL 1.16.

Four fixed pairs (random prompt, chosen and rejected ids of varied lengths) are scored by two
checkpoints, the policy and the reference (`MODELS`, one module-scoped setup each):

* tiny: a tiny random Llama and a second one of another seed, in float64 (the log-prob kernels of
  both sides accumulate in float32), ids below 256;
* smollm2: the bundled SmolLM2-135M-Instruct and a copy with seeded noise (0.2 x each weight's
  spread) on every MLP down-projection, written by `save_pretrained` and loaded by both sides, in
  float32, on pairs twice as long (10 to 26 tokens a document) with ids from the real vocabulary;
  ours on the packed layout only (the tiny checkpoints cover the layouts; all of them on SmolLM2
  would cost ~30 s more). Rewards are ~0.1 to 0.8 there, the summed logps ~ -110.

Each side:

* ours: `PreferenceObjective` through the step engine (`evaluate_objective`: prepare, field check,
  `Normaliser` with the extra counts, `compute`, metric means) on up to three layouts of the pairs:
  pairs packed two to a row, one document per row, and two micro-batches; the reference pass
  writes the per-token field `ref_logprobs` (and, on the packed layout, once more the way a
  precomputed cache does: each document's sum on its first scored token);
* TRL: `DPOTrainer.compute_loss` (under no_grad) on the same checkpoints (as transformers models,
  loaded once per setup: compute_loss changes no weight) with the ids collated by the trainer's
  `DataCollatorForPreference`, metrics read from `trainer._metrics["train"]`; SimPO from
  `trl.experimental.cpo.CPOTrainer.compute_loss` (loss_type "simpo", cpo_alpha 0) with ids
  collated by its `DPODataCollatorWithPadding`, metrics from `trainer._stored_metrics["train"]`.

Checked for sigmoid (label smoothing 0 and 0.1), robust (0.1), hinge, ipo, sigmoid + sft and
simpo (label smoothing 0 and 0.1): the loss and rewards/chosen, rewards/rejected,
rewards/margins, rewards/accuracies, logps/chosen, logps/rejected.

How TRL 1.16 maps onto ours:

* Metrics: TRL appends, per `compute_loss` call, the mean over the gathered batch; ours reports
  sum / count over micro-batches and ranks. On one process and one call they are the same mean.
* sigmoid with label smoothing: TRL 1.16's DPO `sigmoid` ignores `label_smoothing` (only robust,
  exo_pair and aot read it), while ours is conservative DPO (cDPO, Mitchell 2023). TRL's `aot` on
  a batch of one pair is exactly cDPO (sorting one value is the identity), so this case runs TRL
  one pair per call and averages the calls (which also gives the batch means of the metrics).
* sft: TRL's loss_type ["sigmoid", "sft"] with loss_weights [1, w] adds w x the mean NLL over the
  batch's chosen tokens: ours with sft_weight w (a mean over the global chosen-token count; TRL's
  is per micro-batch, so the two part under gradient accumulation over unequal micro-batches).
* simpo: TRL's `simpo_gamma` is in reward units (CPO subtracts gamma / beta from the log-prob
  margin, then multiplies by beta), as is our `gamma`; beta 2 and gamma 1 tell the conventions
  apart. CPO's logps/* are then length-averaged (`average_log_prob=True`), ours summed, so for
  simpo logps/* are not compared (rewards/* carry the averaged values: beta x mean log-prob).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("trl", minversion="1.16")

from posttrain.data.batch import IGNORE_INDEX, Sample, collate  # noqa: E402
from posttrain.models.hf import load_hf  # noqa: E402
from posttrain.ops import linear_logprobs  # noqa: E402
from posttrain.train.objectives import forward_hidden  # noqa: E402
from posttrain.train.preference import REFERENCE_FREE, PreferenceLoss, PreferenceObjective  # noqa: E402
from posttrain.train.step import evaluate_objective  # noqa: E402
from tests.tiny_models import build_tiny_checkpoint  # noqa: E402

LENGTHS = [(3, 4, 2), (5, 2, 5), (2, 6, 3), (4, 3, 6)]  # (prompt, chosen, rejected) per pair
SMOL_LENGTHS = [(2 * a, 2 * b, 2 * c) for a, b, c in LENGTHS]  # 10 to 26 tokens a document
NOISE = 0.2  # x each weight's spread
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
           "logps/rejected")
CASES = {  # name -> (ours, TRL DPOConfig overrides, or None for CPOTrainer)
    "sigmoid": (PreferenceLoss("sigmoid", beta=0.1), {"loss_type": ["sigmoid"]}),
    "sigmoid_ls": (PreferenceLoss("sigmoid", beta=0.1, label_smoothing=0.1), {"loss_type": ["aot"]}),
    "robust": (PreferenceLoss("robust", beta=0.1, label_smoothing=0.1), {"loss_type": ["robust"]}),
    "hinge": (PreferenceLoss("hinge", beta=0.3), {"loss_type": ["hinge"]}),
    "ipo": (PreferenceLoss("ipo", beta=0.1), {"loss_type": ["ipo"]}),
    "sigmoid_sft": (PreferenceLoss("sigmoid", beta=0.1, sft_weight=0.5),
                    {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]}),
    "simpo": (PreferenceLoss("simpo", beta=2.0, gamma=1.0), None),
    "simpo_ls": (PreferenceLoss("simpo", beta=2.0, gamma=1.0, label_smoothing=0.1), None),
}


MODELS = {  # name -> dtype, pair lengths, token id range, (chunk_size, vocab_chunk_size), our runs
    "tiny": (torch.float64, LENGTHS, (0, 256), (8, 64), ("packed", "per_document", "micro_batches", "cached")),
    "smollm2": (torch.float32, SMOL_LENGTHS, (100, 49152), (16, 4096), ("packed",)),
}


def checkpoints(name: str, root, request) -> tuple[dict, dict]:
    """The HF directories (for ours) and transformers models (for TRL) of the policy and the reference."""
    from transformers import AutoModelForCausalLM

    dtype = MODELS[name][0]
    if name == "tiny":
        dirs = {"policy": build_tiny_checkpoint("llama", root / "policy", seed=0),
                "reference": build_tiny_checkpoint("llama", root / "reference", seed=1)}
        return dirs, {role: AutoModelForCausalLM.from_pretrained(d, dtype=dtype) for role, d in dirs.items()}
    # SmolLM2: the reference is the checkpoint with seeded noise on every MLP down-projection
    policy_dir = request.getfixturevalue("smollm2_dir")
    hf = {role: AutoModelForCausalLM.from_pretrained(policy_dir, dtype=dtype)
          for role in ("policy", "reference")}
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param_name, param in hf["reference"].named_parameters():
            if param_name.endswith("mlp.down_proj.weight"):
                param.add_(torch.randn(param.shape, generator=g, dtype=dtype) * (NOISE * param.std()))
    hf["reference"].save_pretrained(root / "reference")
    return {"policy": policy_dir, "reference": root / "reference"}, hf


@pytest.fixture(scope="module", params=list(MODELS))
def setup(request, tmp_path_factory):
    from transformers import AutoTokenizer

    dtype, lengths, vocab, chunks, runs = MODELS[request.param]
    root = tmp_path_factory.mktemp(f"preference_trl_{request.param}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # these matrices only lose to thread contention (tiny: 4x slower on 2 cores)
    dirs, hf = checkpoints(request.param, root, request)
    ours = {role: load_hf(path, dtype=dtype) for role, path in dirs.items()}
    g = torch.Generator().manual_seed(0)
    pairs = [tuple(torch.randint(*vocab, (n,), generator=g).tolist() for n in ns) for ns in lengths]
    yield {"dirs": dirs, "ours": ours, "hf": hf, "pairs": pairs, "root": root, "dtype": dtype, "chunks": chunks,
           "runs": runs, "tokenizer": AutoTokenizer.from_pretrained(dirs["policy"])}
    torch.set_num_threads(threads)


# ---- ours ---------------------------------------------------------------------------------------


def document(prompt: list[int], completion: list[int], group: int) -> Sample:
    """The Sample contract: labels shifted once, the completion scored, the last position -100."""
    labels = [IGNORE_INDEX] * (len(prompt) - 1) + completion + [IGNORE_INDEX]
    return Sample(prompt + completion, labels, group=group)


def layouts(pairs) -> dict[str, list]:
    """The same pairs as micro-batches in three layouts (documents of a pair adjacent, chosen first)."""
    docs = [[document(p, c, i), document(p, r, i)] for i, (p, c, r) in enumerate(pairs)]
    flat = [d for pair in docs for d in pair]

    def batch(rows):  # rows padded to the longest plus 3 tokens
        return collate(rows, max(sum(map(len, row)) for row in rows) + 3, pad_id=0)

    return {
        "packed": [batch([docs[0] + docs[1], docs[2] + docs[3]])],
        "per_document": [batch([[d] for d in flat])],
        "micro_batches": [batch([docs[1] + docs[0]]), batch([docs[2], docs[3]])],
    }


class Reference:
    """A frozen reference pass writing `ref_logprobs`: per token (0 where nothing is scored), or,
    like a precomputed cache (`cached`), each document's sum on its first scored token."""

    def __init__(self, model, chunks: tuple[int, int], cached: bool = False):
        self.model, self.chunks, self.cached = model, chunks, cached

    def __call__(self, batch):
        with torch.no_grad():
            hidden = forward_hidden(self.model, batch)
            logps = linear_logprobs(hidden, self.model.head_weight, batch.labels, chunk_size=self.chunks[0],
                                    vocab_chunk_size=self.chunks[1], vocab_size=self.model.vocab_size)
        if self.cached:
            docs = batch.document_ids.flatten()
            scored = ((batch.labels.flatten() != IGNORE_INDEX) & (docs >= 0)).nonzero().flatten()
            sums = logps.new_zeros(batch.num_documents).index_add(0, docs[scored], logps.flatten()[scored])
            starts = torch.cat([torch.ones(1, dtype=torch.bool), docs[scored][1:] != docs[scored][:-1]])
            first = scored[starts]
            logps = torch.zeros(logps.numel()).index_put((first,), sums[docs[first]]).view_as(logps)
        return batch.with_fields(ref_logprobs=logps)


def ours(setup, cfg: PreferenceLoss, batches, cached: bool = False) -> dict[str, float]:
    chunks = setup["chunks"]
    reference = None if cfg.loss in REFERENCE_FREE else Reference(setup["ours"]["reference"], chunks, cached)
    objective = PreferenceObjective(cfg, reference, chunk_size=chunks[0], vocab_chunk_size=chunks[1])
    return evaluate_objective(setup["ours"]["policy"], batches, objective)


# ---- TRL ----------------------------------------------------------------------------------------


def text_dataset():
    from datasets import Dataset

    return Dataset.from_dict({"prompt": ["2 + 2 ="], "chosen": [" 4"], "rejected": [" 5"]})


def common_args(setup, cfg: PreferenceLoss) -> dict:
    return dict(output_dir=str(setup["root"] / "trl"), report_to=[], bf16=False, fp16=False, use_cpu=True,
                beta=cfg.beta, label_smoothing=cfg.label_smoothing, seed=0)


def trl_dpo(setup, cfg: PreferenceLoss, overrides: dict) -> dict[str, float]:
    """TRL's DPO loss and metrics; `aot` runs one pair per call (each call is then cDPO)."""
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(**common_args(setup, cfg), max_length=None, precompute_ref_log_probs=False, **overrides)
    trainer = DPOTrainer(model=setup["hf"]["policy"], ref_model=setup["hf"]["reference"], args=args,
                         train_dataset=text_dataset(), processing_class=setup["tokenizer"])
    trainer.model.train()
    examples = [{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r} for p, c, r in setup["pairs"]]
    calls = [[e] for e in examples] if overrides["loss_type"] == ["aot"] else [examples]
    with torch.no_grad():  # values only, as ours (`evaluate_objective`): no autograd graph
        losses = [trainer.compute_loss(trainer.model, trainer.data_collator(batch)).item() for batch in calls]
    logged = trainer._metrics["train"]
    assert all(len(logged[name]) == len(calls) for name in METRICS)
    return {"loss": sum(losses) / len(calls), **{name: sum(logged[name]) / len(calls) for name in METRICS}}


def trl_simpo(setup, cfg: PreferenceLoss) -> dict[str, float]:
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    args = CPOConfig(**common_args(setup, cfg), loss_type="simpo", simpo_gamma=cfg.gamma, cpo_alpha=0.0,
                     max_length=512, remove_unused_columns=False)
    trainer = CPOTrainer(model=setup["hf"]["policy"], args=args, train_dataset=text_dataset(),
                         processing_class=setup["tokenizer"])
    trainer.model.train()
    features = []
    for prompt, chosen, rejected in setup["pairs"]:
        feature = {}
        for name, completion in (("chosen", chosen), ("rejected", rejected)):
            feature[f"{name}_input_ids"] = prompt + completion
            feature[f"{name}_attention_mask"] = [1] * (len(prompt) + len(completion))
            feature[f"{name}_labels"] = [IGNORE_INDEX] * len(prompt) + completion  # unshifted, as CPO's
        features.append(feature)
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, trainer.data_collator(features)).item()
    logged = trainer._stored_metrics["train"]
    return {"loss": loss, **{name: logged[name][-1] for name in METRICS}}


# ---- the checks ---------------------------------------------------------------------------------


def assert_matches(got: dict[str, float], want: dict[str, float], names, label: str) -> None:
    """Within 1e-5 x max(1, |TRL's value|). Measured worst errors in those units, tiny (float64) and
    SmolLM2 (float32): loss 2.4e-7 and 9.8e-7, rewards/* 3.0e-7 and 1.5e-6, logps/* 4.2e-8 and
    7.2e-8 (SmolLM2 relative to each value's own size: at most 5.1e-6, rewards/chosen of hinge)."""
    for name in names:
        tol = 1e-5 * max(1.0, abs(want[name]))
        assert got[name] == pytest.approx(want[name], rel=1e-5, abs=tol), (
            f"{label}: {name} is {got[name]!r}, TRL gives {want[name]!r}")


@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers 5 renames TRL's gradient_checkpointing
@pytest.mark.parametrize("case", list(CASES))
def test_preference_objective_matches_trl(setup, case):
    cfg, overrides = CASES[case]
    want = trl_simpo(setup, cfg) if overrides is None else trl_dpo(setup, cfg, overrides)
    names = ("loss", *(m for m in METRICS if overrides is not None or not m.startswith("logps/")))
    batches = layouts(setup["pairs"])
    runs = {run: ours(setup, cfg, batches[run]) for run in setup["runs"] if run != "cached"}
    if cfg.loss not in REFERENCE_FREE and "cached" in setup["runs"]:
        runs["packed, cached reference"] = ours(setup, cfg, batches["packed"], cached=True)
    for layout, got in runs.items():
        assert_matches(got, want, names, f"{case}, {layout}")
