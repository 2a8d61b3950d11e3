"""DPO end to end: live and precomputed references agree, the reference table is reused, resumed
and fingerprinted, training resumes exactly, the CLI and bad rows behave, exports load, and pairs
stay whole in the data layer.

Most tests train on a synthetic preference file (`dpo_configs.synthetic_pairs`); every run is a
tiny llama for a few steps.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import posttrain.train.reference as reference_module
import posttrain.train.frozen_pass as frozen_pass
import posttrain.train.reference_cache as reference_cache
import posttrain.train.roles as roles
import posttrain.train.trainer as trainer
from posttrain.config.dpo import DPOConfig
from posttrain.config.loading import validate_config
from posttrain.data.pairs import PAIR_LINE_BITS
from posttrain.recipes import dpo as dpo_recipe
from posttrain.recipes.dpo import DPORecipe
from posttrain.train.reference_cache import COMPLETE_FILE, ReferencePass
from tests.integration.stops import sigterm_after_checkpoint
from tests.integration.dpo_configs import (
    REPO, cache_dirs, dpo_config, hh_source, per_step, read_table, run, write_config, write_pairs,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # see the fixture

def assert_metrics_close(a: dict[int, dict], b: dict[int, dict], rtol: float) -> None:
    """Same steps and keys, each value within `rtol` of its magnitude. Log-probs and rewards are
    compared against the step's largest log-prob sum: a reward is beta x a difference of such sums
    (at step 1 it is ~0, with an error relative to the sums)."""
    assert a.keys() == b.keys() and a
    for step in a:
        assert a[step].keys() == b[step].keys(), step
        scale = max([abs(v) for k, v in a[step].items() if "logps/" in k] + [1.0])
        for key, value in a[step].items():
            by_sums = ("logps/" in key or "rewards/" in key) and "accuracies" not in key
            tol = rtol * (scale if by_sums else max(1.0, abs(value)))
            assert abs(value - b[step][key]) <= tol, (step, key, value, b[step][key])


# ------------------------------------------------------------------ live vs precomputed reference, export


@pytest.fixture(scope="module", params=[False, True], ids=["full", "lora"])
def parity_runs(request, model_dir, pairs, tmp_path_factory):
    """The same 3-step run with `dpo.reference: live` and `precompute` (eval every 2 steps).

    Records the reference roles built, the live forwards and the pass's forwards; under LoRA any
    attempt to load a second (frozen) model fails the run."""
    lora = request.param
    root = tmp_path_factory.mktemp("parity")
    roles_built, frozen_loads = [], []
    counts = {"live": 0, "pass": 0}
    real_build_reference, real_build_frozen = dpo_recipe.build_reference, roles.build_frozen
    real_live, real_pass = reference_module.token_logprobs, reference_cache.token_logprobs

    def build_reference(*args, **kwargs):
        role = real_build_reference(*args, **kwargs)
        roles_built.append(role)
        return role

    def build_frozen(*args, **kwargs):
        if lora:
            raise AssertionError("a LoRA policy's reference must be the policy with adapters off, not a copy")
        frozen_loads.append(kwargs.get("model_dir"))
        return real_build_frozen(*args, **kwargs)

    def counting(name, real):
        def wrapped(*args, **kwargs):
            counts[name] += 1
            return real(*args, **kwargs)
        return wrapped

    results = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dpo_recipe, "build_reference", build_reference)
        mp.setattr(roles, "build_frozen", build_frozen)
        mp.setattr(reference_module, "token_logprobs", counting("live", real_live))
        mp.setattr(reference_cache, "token_logprobs", counting("pass", real_pass))
        for ref in ("live", "precompute"):
            before = dict(counts)
            roles_built.clear()
            frozen_loads.clear()
            result = run(model_dir, pairs.train, root, name=ref, steps=3, dpo={"reference": ref},
                         lora={"enabled": lora, "rank": 8, "alpha": 16},
                         eval={"sources": [{"path": str(pairs.held_out)}], "every_steps": 2})
            results[ref] = SimpleNamespace(
                result=result, roles=list(roles_built), frozen_loads=list(frozen_loads),
                live_forwards=counts["live"] - before["live"], pass_forwards=counts["pass"] - before["pass"])
    return lora, results, model_dir


def test_live_and_precomputed_references_give_the_same_steps(parity_runs):
    lora, runs, model_dir = parity_runs
    live, pre = runs["live"], runs["precompute"]
    for r in (live, pre):
        assert r.result.status == "finished" and r.result.steps == 3
    # Live: the frozen role runs on every micro-batch (training and evaluation); nothing precomputed.
    assert live.live_forwards > 0 and live.pass_forwards == 0
    # Precompute: one pass over training + held-out data, then no reference forward at all.
    assert pre.pass_forwards > 0 and pre.live_forwards == 0
    assert len(cache_dirs(pre.result.run_dir)) == 1
    assert not (Path(live.result.run_dir) / "reference").exists()
    for r in (live, pre):
        assert len(r.roles) == 1
        role = r.roles[0]
        if lora:  # the policy itself with its adapters off: no second model
            assert role.is_policy_view and r.frozen_loads == []
        else:
            assert not role.is_policy_view and r.frozen_loads == [model_dir]

    train_live, train_pre = per_step(live.result.run_dir), per_step(pre.result.run_dir)
    assert sorted(train_live) == [1, 2, 3]
    assert {"rewards/accuracies", "rewards/margins", "logps/chosen", "pref/loss"} <= set(train_live[1])
    # Step 1: the policy is the reference, so every reward is 0 and the loss is log 2.
    assert train_live[1]["loss"] == pytest.approx(0.6931472, abs=1e-6)
    assert abs(train_pre[1]["rewards/margins"]) <= 1e-5 * abs(train_pre[1]["logps/chosen"])
    assert train_live[3]["loss"] < train_live[1]["loss"]  # it learns
    assert_metrics_close(train_live, train_pre, rtol=1e-5)
    eval_live, eval_pre = per_step(live.result.run_dir, "eval/"), per_step(pre.result.run_dir, "eval/")
    assert sorted(eval_live) == [2, 3]
    assert_metrics_close(eval_live, eval_pre, rtol=1e-5)
    for a, b in zip(live.result.losses, pre.result.losses):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)


def test_live_and_precomputed_references_agree_on_real_pairs(model_dir, hh_path, tmp_path, pass_forwards):
    """HH dialogues (implicit prompts parsed from `dialogue` markers, `rows` slices for training and
    held-out data, many pairs over max_length and dropped): the pass covers every pair training and
    evaluation meet (a missing one is a KeyError), and both references agree."""
    sections = {
        "steps": 2,
        "data": {"sources": [hh_source(hh_path, [0, 120])], "max_length": 512, "on_error": "skip",
                 "max_skipped_fraction": 0.5},
        "eval": {"sources": [hh_source(hh_path, [1750, None])]},
    }
    live = run(model_dir, hh_path, tmp_path, name="live", dpo={"reference": "live"}, **sections)
    pre = run(model_dir, hh_path, tmp_path, name="precompute", **sections)
    assert live.status == pre.status == "finished"
    assert pass_forwards and per_step(pre.run_dir)[1]["data/dropped"] > 0
    assert_metrics_close(per_step(live.run_dir), per_step(pre.run_dir), rtol=1e-5)
    assert_metrics_close({0: live.eval}, {0: pre.eval}, rtol=1e-5)
    assert 0.0 <= pre.eval["rewards/accuracies"] <= 1.0


def test_the_pass_covers_every_source_of_a_mix(model_dir, tmp_path):
    """Two training sources mixed 1:1, 8 and 32 pairs, repeating: training meets all 40 pairs, so the
    pass must read each source whole. (It used to read them as one mix, which ends with its first
    source to run out: with seed 0 after the 8 pairs of `a`, so training then failed with
    'no reference log-probs for pair ...' on `b`'s first pair.)"""
    a, b = write_pairs(tmp_path / "a.jsonl", 8, variant="A. "), write_pairs(tmp_path / "b.jsonl", 32, variant="B. ")
    held_out = write_pairs(tmp_path / "held_out.jsonl", 4, variant="Held out. ")
    result = run(model_dir, a, tmp_path, steps=6, data={"sources": [{"path": str(a)}, {"path": str(b)}]},
                 eval={"sources": [{"path": str(held_out)}]})
    assert result.status == "finished" and result.steps == 6
    (directory,) = cache_dirs(result.run_dir)
    table = read_table(directory)
    lines_by_key = {}
    for pair in table:
        lines_by_key.setdefault(pair >> PAIR_LINE_BITS, set()).add(pair & ((1 << PAIR_LINE_BITS) - 1))
    assert sorted(map(len, lines_by_key.values())) == [4, 8, 32]
    assert all(lines == set(range(1, len(lines) + 1)) for lines in lines_by_key.values())
    assert {p.name.split("-")[0] for p in directory.glob("*.safetensors")} == {"s0", "s1", "s2"}  # a stream each


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_export_loads_with_transformers(parity_runs):
    """Full fine-tuning exports an HF model; LoRA also a PEFT adapter equal to the merged model."""
    from transformers import AutoModelForCausalLM

    lora, runs, model_dir = parity_runs
    export = Path(runs["precompute"].result.export_dir)
    assert export == Path(runs["precompute"].result.run_dir) / "export"
    merged = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = torch.randint(0, base.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(_logits(merged, ids), _logits(base, ids))  # trained
    assert (export / "adapter").is_dir() == lora
    if lora:
        from peft import PeftModel

        assert json.loads((export / "adapter" / "adapter_config.json").read_text())["r"] == 8
        adapted = PeftModel.from_pretrained(base, export / "adapter")
        torch.testing.assert_close(_logits(adapted, ids), _logits(merged, ids), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------- the reference table: reuse, resume, fingerprint


def test_a_rerun_reuses_the_precomputed_table(model_dir, pairs, tmp_path, pass_forwards, caplog):
    caplog.set_level(logging.INFO, logger="posttrain")
    first = run(model_dir, pairs.train, tmp_path, steps=2)
    assert len(pass_forwards) > 0
    (directory,) = cache_dirs(first.run_dir)
    assert json.loads((directory / COMPLETE_FILE).read_text())["pairs_scored"] == 32
    assert "reference log-probs: one pass over the data into" in caplog.text
    table = read_table(directory)
    assert len(table) == 32

    # The same config again (checkpoint.resume: never starts over in the same run directory).
    pass_forwards.clear()
    caplog.clear()
    again = run(model_dir, pairs.train, tmp_path, steps=2)
    assert again.status == "finished" and again.run_dir == first.run_dir
    assert pass_forwards == []  # no reference forward at all
    assert f"reference log-probs: reusing {directory} (32 pairs)" in caplog.text
    assert "one pass over the data" not in caplog.text
    assert cache_dirs(again.run_dir) == [directory]
    assert again.losses == first.losses


class Killed(RuntimeError):
    """Stands for the process dying in the middle of the reference pass."""


@pytest.mark.parametrize("how", ["killed", "sigterm"])
def test_an_interrupted_pass_resumes_where_it_stopped(model_dir, pairs, tmp_path, monkeypatch, how):
    """One part per batch; the pass ends after 2 parts, in the third batch's forward (an
    exception, or SIGTERM, which stops a run in set-up at once); the rerun computes only the
    rest, and its table equals one computed in one go in another run directory."""
    monkeypatch.setattr(frozen_pass, "PART_BATCHES", 1)
    real = reference_cache.token_logprobs
    calls = []

    def interrupting(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            if how == "killed":
                raise Killed("killed")
            signal.raise_signal(signal.SIGTERM)  # inside set-up: the run stops at once
        return real(*args, **kwargs)

    sections = {"steps": 1, "eval": {"sources": [{"path": str(pairs.held_out)}]}}
    monkeypatch.setattr(reference_cache, "token_logprobs", interrupting)
    if how == "killed":
        with pytest.raises(Killed):
            run(model_dir, pairs.train, tmp_path / "a", **sections)
    else:
        stopped = run(model_dir, pairs.train, tmp_path / "a", **sections)
        assert stopped.status == "stopped" and stopped.steps == 0
    run_dir = tmp_path / "a" / "run"
    (directory,) = cache_dirs(run_dir)
    assert not (directory / COMPLETE_FILE).exists()
    parts = sorted(p.name for p in directory.glob("*.safetensors"))
    assert parts == ["s0-r00000-p000000.safetensors", "s0-r00000-p000001.safetensors"]
    assert not list(directory.glob("*.tmp"))

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(reference_cache, "token_logprobs", counted)
    calls.clear()
    resumed = run(model_dir, pairs.train, tmp_path / "a", **sections)
    assert resumed.status == "finished"
    rest = len(calls)
    assert (directory / COMPLETE_FILE).exists()

    calls.clear()
    whole = run(model_dir, pairs.train, tmp_path / "b", **sections)
    (whole_directory,) = cache_dirs(whole.run_dir)
    assert whole_directory.name == directory.name  # the run directory is not part of the fingerprint
    assert rest == len(calls) - 2  # only the batches not on disk were run again
    resumed_table, whole_table = read_table(directory), read_table(whole_directory)
    assert sorted(resumed_table) == sorted(whole_table) and len(whole_table) == 40  # 32 + 8 held out
    for pair, sums in whole_table.items():
        torch.testing.assert_close(resumed_table[pair], sums, rtol=1e-6, atol=1e-5)
    assert sorted(p.name for p in directory.iterdir()) == sorted(p.name for p in whole_directory.iterdir())


class _Computing(Exception):
    pass


def test_the_fingerprint_covers_data_reference_and_precision(model_dir, pairs, tmp_path, monkeypatch):
    """The cache directory the recipe chooses (before any forward pass) for variations of a config."""
    chosen = []

    def computing(self, *args, **kwargs):
        chosen.append(self.directory)
        raise _Computing

    monkeypatch.setattr(ReferencePass, "run", computing)
    data = write_pairs(tmp_path / "train.jsonl", 16)
    ctx = SimpleNamespace(model_dir=model_dir, stop=None, tokenizer=None, dp=SimpleNamespace(rank=0, size=1),
                          env=SimpleNamespace(rank=0, device=torch.device("cpu"), is_main=True))

    def cache_dir(**sections) -> Path:
        cfg = validate_config(dpo_config(model_dir, data, tmp_path / "runs", **sections), DPOConfig)
        with pytest.raises(_Computing):
            DPORecipe(cfg)._precomputed(ctx)
        return chosen[-1]

    base = cache_dir()
    assert base.parent == tmp_path / "runs" / "run" / "reference"
    assert cache_dir() == base
    assert cache_dir(train={"lr": 5e-4}) == base  # the optimiser does not change reference log-probs
    assert cache_dir(train={"steps": 7, "micro_batch_size": 1}) == base
    assert cache_dir(dpo={"beta": 0.3}) == base
    assert cache_dir(reference_model={"dtype": "bfloat16"}) != base
    assert cache_dir(train={"precision": "bf16_autocast"}) != base
    assert cache_dir(data={"max_length": 200}) != base
    assert cache_dir(data={"sources": [{"path": str(data), "rows": [0, 8]}]}) != base
    assert cache_dir(eval={"sources": [{"path": str(pairs.held_out)}]}) != base
    copy = shutil.copytree(model_dir, tmp_path / "reference_copy")
    assert cache_dir(reference_model={"path": str(copy)}) != base

    stat = data.stat()
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # touched: same bytes
    touched = cache_dir()
    assert touched != base
    write_pairs(data, 16, variant="Changed. ")  # new content
    assert cache_dir() not in (base, touched)


# ------------------------------------------------------------------------------------ training resume


def test_resume_is_exact_and_reuses_the_table(model_dir, pairs, tmp_path, monkeypatch, pass_forwards, caplog):
    """4 steps straight vs stopped by SIGTERM right after the step-2 checkpoint, then resumed."""
    sections = {"steps": 4, "checkpoint": {"every_steps": 2, "resume": "auto"}, "train": {"schedule": "cosine"}}
    straight = run(model_dir, pairs.train, tmp_path / "a", **sections)
    assert straight.status == "finished" and straight.steps == 4

    real_checkpoint = trainer._checkpoint
    sigterm_after_checkpoint(monkeypatch, 2)
    stopped = run(model_dir, pairs.train, tmp_path / "b", **sections)
    assert stopped.status == "stopped" and stopped.steps == 2
    assert not (tmp_path / "b" / "run" / "export").exists()
    monkeypatch.setattr(trainer, "_checkpoint", real_checkpoint)

    pass_forwards.clear()
    caplog.set_level(logging.INFO, logger="posttrain")
    resumed = run(model_dir, pairs.train, tmp_path / "b", **sections)
    assert resumed.status == "finished" and resumed.steps == 4 and len(resumed.losses) == 2
    assert "resuming from step_2" in caplog.text
    assert "reference log-probs: reusing" in caplog.text and pass_forwards == []

    a, b = per_step(straight.run_dir), per_step(resumed.run_dir)
    assert sorted(b) == [1, 2, 3, 4]
    for step in (3, 4):
        for key, value in a[step].items():
            assert b[step][key] == pytest.approx(value, rel=1e-6, abs=1e-9), (step, key)
    assert resumed.losses == pytest.approx(straight.losses[2:], rel=1e-6)


# ------------------------------------------------------------------------------------ CLI


def test_cli_trains_and_prints_a_summary(model_dir, pairs, tmp_path):
    config = write_config(tmp_path / "dpo.yaml", model_dir, pairs.train, tmp_path, steps=5,
                          eval={"sources": [{"path": str(pairs.held_out)}]})
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "posttrain.cli", "dpo", str(config), "train.steps=2"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["status"] == "finished" and summary["steps"] == 2
    assert summary["run_dir"] == str(tmp_path / "run")
    assert summary["export"] == str(tmp_path / "run" / "export")
    assert 0.0 <= summary["eval"]["rewards/accuracies"] <= 1.0
    assert {"loss", "rewards/margins", "logps/chosen", "logps/rejected"} <= set(summary["eval"])
    assert "reference log-probs: one pass over the data" in proc.stderr


@pytest.mark.parametrize("sections, field, words", [
    ({"data": {"task": "sft"}}, "data.task", "'sft': preference optimisation reads chosen/rejected pairs"),
    ({"dpo": {"loss": "simpo", "reference": "precompute"}}, "dpo.reference", "loss simpo is reference-free"),
], ids=["sft_task", "simpo_with_precompute"])
def test_cli_rejects_inconsistent_configs(model_dir, pairs, tmp_path, capsys, sections, field, words):
    """`posttrain.cli.main` is what `python -m posttrain.cli` exits with (in process: no start-up)."""
    from posttrain.cli import main

    config = write_config(tmp_path / "dpo.yaml", model_dir, pairs.train, tmp_path, **sections)
    assert main(["dpo", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"posttrain: error: invalid config {config} (1 problem):"), err
    assert re.search(rf"^  {re.escape(field)}: {re.escape(words)}.*\[{re.escape(str(config))}:\d+\]$", err, re.M), err
    assert not (tmp_path / "run").exists()  # nothing started
