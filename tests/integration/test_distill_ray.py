"""`teacher.placement: separate`: the teacher in a Ray actor of its own, its hidden states sent back
over a two-process gloo group. The actor's answers equal a local teacher's (fp32 and bf16); a
forward that fails there and an actor that is SIGKILLed are reported with their cause, naming its
pid; a run with a separate teacher (live, top-k pass, two ranks) gives a colocated run's losses
and metrics, and one whose actor is SIGKILLed mid-run resumes with a new actor and still does."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from posttrain.cluster.launch import launch
from posttrain.config.loading import ConfigError, validate_config
from posttrain.config.distill import DistillConfig, TeacherConfig
from posttrain.data.batch import Sample, collate
from posttrain.models.common.attention import packed_attention
from posttrain.models.hf import load_hf
from posttrain.recipes.distill import run_distill
from posttrain.recipes.teacher_actor import start_teacher
from posttrain.train.objectives import forward_hidden
from posttrain.train.remote_teacher import TeacherGone
from tests.integration.dpo_configs import per_step
from tests.integration.stops import wait_gone
from tests.integration.test_distill import assert_steps_close, distill_config, run

pytestmark = pytest.mark.usefixtures("one_thread")
ON_RAY = {"backend": "ray", "num_workers": 1, "cpus_per_worker": 1}
SEPARATE = {"placement": "separate", "cpus": 1}


def packed(lengths: list[list[int]], length: int, vocab: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    rows = [[Sample(torch.randint(1, vocab, (n,), generator=generator).tolist(), [-100] * n) for n in row]
            for row in lengths]
    return collate(rows, length, pad_id=0)


def test_a_separate_teacher_needs_the_ray_backend(teacher_dir, task_dir, tmp_path):
    cfg = distill_config(teacher_dir, task_dir, tmp_path, teacher=SEPARATE)
    with pytest.raises(ConfigError, match="teacher.placement: separate .*set launcher.backend: ray"):
        validate_config(cfg, DistillConfig)


def test_a_separate_gpu_teacher_is_refused(teacher_dir, task_dir, tmp_path):
    cfg = distill_config(teacher_dir, task_dir, tmp_path, teacher=SEPARATE, launcher={**ON_RAY, "gpus_per_worker": 1})
    with pytest.raises(ConfigError, match="a GPU teacher actor is not built"):
        validate_config(cfg, DistillConfig)


def test_the_teacher_actor_answers_like_a_local_teacher_and_reports_failures(ray_instance, teacher_dir):
    """The actor also outwaits its `timeout_s` between requests (the rank's wait for an answer)."""
    local = load_hf(teacher_dir).eval()
    role = TeacherConfig(path=str(teacher_dir), timeout_s=3, **SEPARATE)
    remote = start_teacher(role, teacher_dir, device=torch.device("cpu"), precision="fp32")
    try:
        with remote.active() as model:
            assert torch.equal(model.head_weight, local.head_weight) and model.vocab_size == local.vocab_size
            for seed, lengths in enumerate([[[5, 9], [14]], [[3, 3, 3, 7]]]):
                batch = packed(lengths, 16, local.vocab_size, seed)
                with torch.no_grad():
                    expected = forward_hidden(local, batch)
                got = forward_hidden(model, batch)  # through the model's forward
                model.submit(batch)  # and as the objective uses it
                again = model.collect()
                scale = expected.abs().max().item()
                torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6 * scale)
                assert torch.equal(again, got)
            time.sleep(4)  # idle for longer than timeout_s
            assert torch.equal(forward_hidden(model, batch), got)
            bad = packed([[4, 4]], 8, local.vocab_size)
            bad.input_ids[0, 1] = 10**7  # the teacher's embedding lookup fails
            with pytest.raises(TeacherGone, match=rf"pid {remote.handle.pid}\b.*IndexError"):
                model(bad.input_ids, bad.position_ids, _attn(bad))
    finally:
        remote.close()
    wait_gone(remote.handle.pid)

    patient = role.model_copy(update={"timeout_s": 60})
    remote = start_teacher(patient, teacher_dir, device=torch.device("cpu"), precision="fp32")
    remote.model.submit(packed([[6]], 8, local.vocab_size))  # then the step raised: never collected
    started = time.monotonic()
    remote.close()  # kills the actor: telling it to stop would wait (60 s) behind its answer
    wait_gone(remote.handle.pid)
    assert time.monotonic() - started < 10

    half = role.model_copy(update={"dtype": "bfloat16"})  # bf16 on the wire: the head and hidden states
    remote = start_teacher(half, teacher_dir, device=torch.device("cpu"), precision="fp32")
    try:
        batch = packed([[7, 9]], 16, local.vocab_size)
        with remote.active() as model, torch.no_grad():
            local = load_hf(teacher_dir, dtype=torch.bfloat16).eval()
            got, expected = forward_hidden(model, batch), forward_hidden(local, batch)
            assert got.dtype == model.head_weight.dtype == torch.bfloat16
            assert torch.equal(model.head_weight, local.head_weight) and torch.equal(got, expected)
        os.kill(remote.handle.pid, signal.SIGKILL)
        wait_gone(remote.handle.pid)
        started = time.monotonic()
        with pytest.raises(TeacherGone, match=rf"pid {remote.handle.pid}\b.*actor died"):
            with remote.active() as model:
                forward_hidden(model, packed([[6]], 8, local.vocab_size))
        assert time.monotonic() - started < 15
    finally:
        remote.close()


def test_a_teacher_actor_that_cannot_start_is_reported_and_killed(ray_instance, tmp_path, monkeypatch):
    import posttrain.recipes.teacher_actor as teacher_actor

    empty = tmp_path / "no-weights"  # a config the actor cannot load a model from
    empty.mkdir()
    (empty / "config.json").write_text('{"model_type": "no-such-family"}')
    with pytest.raises(TeacherGone, match="the teacher actor failed to start"):
        start_teacher(TeacherConfig(path=str(empty), **SEPARATE), empty, device=torch.device("cpu"), precision="fp32")
    monkeypatch.setattr(teacher_actor, "START_TIMEOUT_S", 1.0)
    too_big = TeacherConfig(path=str(empty), placement="separate", cpus=64)  # never scheduled on 2 CPUs
    with pytest.raises(RuntimeError, match=r"did not load its teacher within 1 s \(teacher.cpus 64"):
        start_teacher(too_big, empty, device=torch.device("cpu"), precision="fp32")
    import ray

    assert not [n for n in ray.util.list_named_actors() if n.startswith(teacher_actor.NAME_PREFIX)]


def _attn(batch):
    rows, length = batch.input_ids.shape
    return packed_attention(batch.cu_seqlens, batch.max_seqlen, rows, length)


@pytest.mark.parametrize("signal_kind, ranks", [("live", 1), ("topk", 1), ("live", 2)],
                         ids=["live", "topk", "live-two-ranks"])
def test_a_separate_teacher_distils_like_a_colocated_one(ray_instance, teacher_dir, task_dir, tmp_path,
                                                         signal_kind, ranks):
    """Two ranks (FSDP2 over the student, half the micro-batch each) have an actor each."""
    distill = {"loss": "jsd", "temperature": 1.5, "kd_weight": 0.8, "teacher_signal": signal_kind, "topk": 16}
    here = run(teacher_dir, task_dir, tmp_path / "here", steps=3, distill=distill)
    cpus = 1 / ranks  # the module's Ray instance has 2 CPUs: a rank and its actor share one
    cfg = distill_config(teacher_dir, task_dir, tmp_path / "apart", steps=3, distill=distill,
                         teacher={**SEPARATE, "cpus": cpus},
                         launcher={**ON_RAY, "num_workers": ranks, "cpus_per_worker": cpus})
    cfg["train"]["micro_batch_size"] //= ranks
    cfg = validate_config(cfg, DistillConfig)
    apart = launch(run_distill, cfg, cfg.launcher).main
    assert here.status == apart.status == "finished"
    near, far = per_step(here.run_dir), per_step(apart.run_dir)
    assert_steps_close(near, far, rtol=1e-5)
    waits = [row.get("distill/teacher_wait_s") for row in far.values()]  # the actor was used
    assert all(w is not None and w >= 0 for w in waits) if signal_kind == "live" else not any(waits)
    assert not any("distill/teacher_wait_s" in row for row in near.values())


def _teacher_pids() -> list[int]:
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if b"TeacherActor" in cmdline.read_bytes():
                pids.append(int(cmdline.parent.name))
        except OSError:
            continue  # the process ended while we looked
    return pids


def _kill_teacher_after(marker: Path, killed: list[int], stop: threading.Event) -> None:
    while not stop.is_set():
        pids = _teacher_pids()
        if marker.exists() and pids:
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            killed.extend(pids)
            return
        time.sleep(0.01)


def test_a_run_whose_teacher_actor_is_killed_resumes_with_a_new_one(ray_instance, teacher_dir, task_dir, tmp_path):
    """The rank fails with TeacherGone, the launcher restarts it from the newest checkpoint with a
    fresh actor, and every step's loss is a straight colocated run's."""
    sections = {"steps": 4, "checkpoint": {"every_steps": 1, "resume": "auto", "keep_last": 4}}
    here = run(teacher_dir, task_dir, tmp_path / "here", **sections)
    cfg = validate_config(distill_config(teacher_dir, task_dir, tmp_path / "apart", teacher=SEPARATE,
                                         launcher={**ON_RAY, "max_restarts": 1}, **sections), DistillConfig)
    killed: list[int] = []
    stop = threading.Event()
    marker = Path(cfg.run_dir) / "checkpoints" / "step_2" / "meta.json"
    killer = threading.Thread(target=_kill_teacher_after, args=(marker, killed, stop), daemon=True)
    killer.start()
    try:
        result = launch(run_distill, cfg, cfg.launcher)
    finally:
        stop.set()
        killer.join()
    assert killed, "the run ended before its teacher actor could be killed"
    assert result.restarts == 1 and result.main.status == "finished" and result.main.steps == 4
    near, far = per_step(here.run_dir), per_step(result.main.run_dir)
    assert_steps_close(near, far, rtol=1e-5)
    assert far[4]["restarts"] == 1 and far[2]["restarts"] == 0
