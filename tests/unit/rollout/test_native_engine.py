"""NativeEngine: n samples, per-sample seeds, both log-prob kinds, weight updates, sleep/wake."""

from __future__ import annotations

import pytest
import torch

from posttrain.models.generate import generate
from posttrain.models.hf import load_hf
from posttrain.models.lora import apply_lora
from posttrain.parallel.export import iter_hf_tensors_for_sync
from posttrain.rollout import GenerationEngine, NativeEngine, RolloutBatch, SamplingParams
from tests.unit.models.sampling_helpers import close, full_forward_logits, hand_logprob

PROMPTS = [[60, 61, 62, 63, 64, 65, 66], [70, 71], [80, 81, 82, 83, 84, 85, 86, 87, 88, 89, 90, 91]]
GREEDY = SamplingParams(temperature=0, max_new_tokens=8)
SAMPLED = SamplingParams(temperature=0.9, top_k=40, top_p=0.95, max_new_tokens=8)


@pytest.fixture(scope="module")
def llama_dir(tiny_checkpoints):
    return tiny_checkpoints["llama"]  # untied head, and a key map with ignorable keys


@pytest.fixture
def engine(llama_dir):
    from transformers import AutoTokenizer

    return NativeEngine(load_hf(llama_dir), AutoTokenizer.from_pretrained(llama_dir))


def _snapshot(model) -> list[tuple[str, torch.Tensor]]:
    """The model's HF-named tensors, copied (a plain model's stream holds live parameters)."""
    return [(name, t.clone()) for name, t in iter_hf_tensors_for_sync(model)]


def _perturbed(named: list[tuple[str, torch.Tensor]], scale: float = 0.5) -> list[tuple[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(3)
    return [(name, t + scale * t.std() * torch.randn(t.shape, generator=generator)) for name, t in named]


def _same_batch(a: RolloutBatch, b: RolloutBatch) -> bool:
    return torch.equal(a.tokens, b.tokens) and torch.equal(a.raw_logprobs, b.raw_logprobs)


def test_n_samples_per_prompt_in_prompt_major_order(engine):
    stops = set(range(0, 256, 3))
    stop_often = SamplingParams(temperature=1.0, max_new_tokens=6, stop=tuple(stops))
    batch = engine.generate(PROMPTS, stop_often, n=4, seed=0)
    assert isinstance(engine, GenerationEngine) and len(batch) == 12
    assert batch.prompt_index.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert batch.sample_index.tolist() == [0, 1, 2, 3] * 3
    assert batch.prompt_ids == [p for p in PROMPTS for _ in range(4)]
    assert batch.tokens.dtype == batch.lengths.dtype == torch.long
    assert batch.logprobs.dtype == batch.raw_logprobs.dtype == torch.float32
    assert batch.tokens.shape == batch.logprobs.shape == (12, int(batch.lengths.max()))
    mask = batch.mask()
    assert torch.equal(mask.sum(1), batch.lengths) and not mask.all()  # some samples stopped early
    assert (batch.tokens[~mask] == engine.pad_id).all() and (batch.logprobs[~mask] == 0).all()
    assert (batch.raw_logprobs[~mask] == 0).all() and (batch.raw_logprobs[mask] < 0).all()
    for i, reason in enumerate(batch.finish_reasons):
        last = batch.tokens[i, batch.lengths[i] - 1].item()
        assert reason == ("stop" if last in stops | engine.eos_ids else "length")
        assert reason == "stop" or batch.lengths[i] == 6
    assert len({tuple(batch.tokens[i].tolist()) for i in range(4)}) > 1  # samples of one prompt differ
    assert len(batch.texts) == 12 and batch.policy_version == 0


def test_a_sample_does_not_depend_on_the_rest_of_the_batch(engine):
    full = engine.generate(PROMPTS, SAMPLED, n=3, seed=11)

    def check(part: RolloutBatch, rows: list[int]) -> None:
        assert part.prompt_index.tolist() == full.prompt_index[rows].tolist()
        assert part.sample_index.tolist() == full.sample_index[rows].tolist()
        width = part.tokens.shape[1]
        assert torch.equal(part.tokens, full.tokens[rows, :width]) and width == int(full.lengths[rows].max())
        scale = full.raw_logprobs.abs().max().item()
        close(part.logprobs, full.logprobs[rows, :width], scale)
        close(part.raw_logprobs, full.raw_logprobs[rows, :width], scale)

    check(engine.generate([PROMPTS[1]], SAMPLED, n=1, seed=11, prompt_index=[1]), [3])  # alone
    check(engine.generate(PROMPTS[:1], SAMPLED, n=2, seed=11), [0, 1])  # other prompts gone, smaller n
    check(engine.generate([PROMPTS[2], PROMPTS[0]], SAMPLED, n=2, seed=11, prompt_index=[2, 0]), [6, 7, 0, 1])
    other_seed = engine.generate(PROMPTS, SAMPLED, n=3, seed=12)
    assert not torch.equal(other_seed.tokens, full.tokens)


def test_a_sample_keeps_its_tokens_when_n_grows(engine):
    few = engine.generate(PROMPTS, SAMPLED, n=2, seed=4)
    many = engine.generate(PROMPTS, SAMPLED, n=5, seed=4)
    for p in range(len(PROMPTS)):
        for s in range(2):
            a, b = few.tokens[2 * p + s], many.tokens[5 * p + s]
            length = int(few.lengths[2 * p + s])
            assert length == int(many.lengths[5 * p + s]) and torch.equal(a[:length], b[:length])


def test_both_logprob_kinds(engine):
    batch = engine.generate(PROMPTS, SAMPLED, n=2, seed=5)
    for i in range(len(batch)):
        generated = batch.tokens[i, : batch.lengths[i]].tolist()
        logits = full_forward_logits(engine.model, batch.prompt_ids[i], generated)
        scale = logits.abs().max().item() / SAMPLED.temperature
        expected_raw = torch.log_softmax(logits, -1).gather(-1, torch.tensor(generated)[:, None])[:, 0]
        close(batch.raw_logprobs[i, : len(generated)], expected_raw, scale)
        expected = [hand_logprob(row, t, 0.9, 40, 0.95) for row, t in zip(logits.tolist(), generated)]
        close(batch.logprobs[i, : len(generated)], expected, scale)
    greedy = engine.generate(PROMPTS, GREEDY, n=2)
    assert (greedy.logprobs == 0).all() and (greedy.raw_logprobs < 0).all()
    assert torch.equal(greedy.tokens[0::2], greedy.tokens[1::2])  # greedy samples are all alike


def test_update_weights_changes_the_output_and_restoring_restores_it(engine):
    original = _snapshot(engine.model)
    before = engine.generate(PROMPTS, GREEDY)
    ignorable = ("model.layers.0.self_attn.rotary_emb.inv_freq", torch.ones(4))  # skipped, as on load
    engine.update_weights(iter([ignorable, *_perturbed(original)]))
    assert engine.policy_version == 1
    changed = engine.generate(PROMPTS, GREEDY)
    assert changed.policy_version == 1 and not torch.equal(changed.tokens, before.tokens)
    engine.update_weights(iter(original), version=7)
    after = engine.generate(PROMPTS, GREEDY)
    assert after.policy_version == 7 and _same_batch(after, before)
    assert torch.equal(after.logprobs, before.logprobs)


def test_update_weights_casts_and_pads_the_vocabulary_like_load_hf(llama_dir):
    from transformers import AutoTokenizer

    engine = NativeEngine(load_hf(llama_dir, dtype=torch.bfloat16), AutoTokenizer.from_pretrained(llama_dir))
    trainer = load_hf(llama_dir)
    with torch.no_grad():
        for p in trainer.parameters():
            p.add_(0.01)
        engine.model.tok_embeddings.weight[trainer.vocab_size :] = 1.0  # padding must come back zero
    engine.update_weights(iter_hf_tensors_for_sync(trainer))
    for (name, ours), (_, theirs) in zip(_snapshot(engine.model), _snapshot(trainer), strict=True):
        assert ours.dtype == torch.bfloat16 and torch.equal(ours, theirs.to(torch.bfloat16)), name
    assert (engine.model.tok_embeddings.weight[trainer.vocab_size :] == 0).all()
    assert (engine.model.output.weight[trainer.vocab_size :] == 0).all()


def _bad_streams(original: list[tuple[str, torch.Tensor]]):
    """(stream, message) pairs; each stream first delivers some good but different tensors."""
    good = _perturbed(original)
    name, tensor = original[7]  # a 2-D weight of layer 0
    nonsense = "model.layers.0.mlp.nonsense.weight"
    yield good[:5] + [(nonsense, tensor)] + good[5:], f"unknown tensor '{nonsense}'"
    yield good[:7] + [(name, tensor[:, :-1])] + good[8:], f"tensor '{name}' has shape"
    yield good[:7] + [(name, tensor.long())] + good[8:], f"tensor '{name}' has dtype torch.int64"
    yield good[:7] + [good[7], good[7]] + good[8:], f"tensor '{name}' given twice"
    bias = "model.layers.0.self_attn.q_proj.bias"  # llama has none
    yield good[:5] + [(bias, tensor[0])] + good[5:], f"tensor '{bias}' has no place in this model"
    yield good[:-1], f"got no tensor for {original[-1][0]}"


def test_bad_updates_are_refused_and_leave_the_engine_unchanged(engine):
    original = _snapshot(engine.model)
    before = engine.generate(PROMPTS, GREEDY)
    for stream, message in _bad_streams(original):
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            engine.update_weights(iter(stream))
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(_snapshot(engine.model), original, strict=True))
        assert engine.policy_version == 0 and _same_batch(engine.generate(PROMPTS, GREEDY), before)


def test_sleep_offloads_and_wake_restores(engine):
    before = engine.generate(PROMPTS, GREEDY)
    original = _snapshot(engine.model)
    engine.sleep()
    assert all(p.device.type == "cpu" for p in engine.model.parameters())
    with pytest.raises(RuntimeError, match=r"asleep \(level 1\); call wake\(\) before generate"):
        engine.generate(PROMPTS, GREEDY)
    with pytest.raises(RuntimeError, match="call wake"):
        engine.update_weights(iter(original))
    with pytest.raises(RuntimeError, match="already asleep"):
        engine.sleep(2)
    engine.wake()
    engine.wake()  # waking an awake engine does nothing
    assert _same_batch(engine.generate(PROMPTS, GREEDY), before)
    with pytest.raises(ValueError, match="sleep level"):
        engine.sleep(3)


def test_sleep_level_2_discards_weights_until_an_update(engine):
    before = engine.generate(PROMPTS, GREEDY)
    original = _snapshot(engine.model)
    engine.sleep(2)
    assert all(p.is_meta for p in engine.model.parameters())
    engine.wake()
    assert not any(p.is_meta for p in engine.model.parameters())
    with pytest.raises(RuntimeError, match="discarded by sleep"):
        engine.generate(PROMPTS, GREEDY)
    with pytest.raises(ValueError, match="got no tensor"):
        engine.update_weights(iter(original[:-1]))
    with pytest.raises(RuntimeError, match="discarded by sleep"):  # a failed update does not count
        engine.generate(PROMPTS, GREEDY)
    engine.update_weights(iter(original))
    assert _same_batch(engine.generate(PROMPTS, GREEDY), before)


def _train_lora(model, steps: int = 3) -> None:
    """A few AdamW steps on random next-token data: the adapters move away from B = 0."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    ids = torch.randint(0, 250, (4, 16), generator=torch.Generator().manual_seed(0))
    for _ in range(steps):
        logits = model.logits(model(ids[:, :-1]))[..., : model.vocab_size]
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
        optimizer.step()
        optimizer.zero_grad()


def test_streaming_a_trained_lora_model_makes_the_engine_generate_like_it(engine, llama_dir):
    from transformers import AutoTokenizer

    trainer = load_hf(llama_dir)
    apply_lora(trainer, rank=4, alpha=8, target_modules=["wq", "wk", "wv", "wo", "w1", "w2", "w3"])
    _train_lora(trainer)
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    expected = generate(trainer, tokenizer, PROMPTS, max_new_tokens=8, temperature=0)
    assert engine.generate(PROMPTS, GREEDY).tokens.tolist() != expected.token_ids
    engine.update_weights(iter_hf_tensors_for_sync(trainer))
    got = engine.generate(PROMPTS, GREEDY)
    assert [row[:n].tolist() for row, n in zip(got.tokens, got.lengths)] == expected.token_ids
    for i, raw in enumerate(expected.raw_logprobs):  # merged vs unmerged adapters: rounding only
        close(got.raw_logprobs[i, : len(raw)], raw, scale=max(map(abs, raw)))


def test_engine_refuses_an_adapted_model(llama_dir):
    from transformers import AutoTokenizer

    model = load_hf(llama_dir)
    apply_lora(model, rank=2, alpha=4, target_modules=["wq"])
    with pytest.raises(ValueError, match="no LoRA adapters"):
        NativeEngine(model, AutoTokenizer.from_pretrained(llama_dir))


def test_lm_head_fp32_keeps_an_fp32_head_over_bf16_weights(llama_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    engine = NativeEngine(load_hf(llama_dir, dtype=torch.bfloat16), tokenizer, lm_head_fp32=True)
    model = engine.model
    assert model.fp32_head.dtype == torch.float32 and torch.equal(model.fp32_head, model.head_weight.float())
    hidden = torch.randn(3, model.args.hidden_size, dtype=torch.bfloat16)
    logits = model.logits(hidden)
    assert logits.dtype == torch.float32
    want = hidden.float() @ model.head_weight.float().T
    torch.testing.assert_close(logits[:, : model.vocab_size], want[:, : model.vocab_size])
    update = _perturbed(_snapshot(load_hf(llama_dir)))
    engine.update_weights(update)  # the fp32 copy follows every update
    assert torch.equal(model.fp32_head, model.head_weight.float())
    engine.sleep(1)
    assert model.fp32_head is None
    engine.wake()
    assert torch.equal(model.fp32_head, model.head_weight.float())
    batch = engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=4), n=2, seed=0)
    assert batch.tokens.shape[0] == 2
    plain = NativeEngine(load_hf(llama_dir, dtype=torch.bfloat16), tokenizer)
    assert plain.model.fp32_head is None and plain.model.logits(hidden).dtype == torch.bfloat16
