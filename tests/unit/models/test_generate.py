"""KV-cache generation: sampling, both log-prob kinds, stopping, prompt forms, prefill modes."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from posttrain.data.chat import ChatRenderer
from posttrain.data.rows import PromptExample
from posttrain.models.generate import default_eos_ids, generate
from posttrain.models.hf import load_hf
from posttrain.models.sampling import (
    SamplingParams,
    inverse_cdf,
    penalise_repeats,
    sample,
    sample_generators,
    sample_seed,
)
from tests.unit.models.sampling_helpers import EPS, close, full_forward_logits, hand_logprob


def _generators(count: int, seed: int = 0) -> list[torch.Generator]:
    return sample_generators(seed, [(i, 0) for i in range(count)])


def test_sample_greedy_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    greedy = sample(logits, SamplingParams(temperature=0), _generators(1))
    assert greedy.tokens.tolist() == [0]
    assert greedy.logprobs.tolist() == [0.0]  # the greedy token had probability 1
    close(greedy.raw_logprobs, torch.log(torch.tensor([0.5])), scale=1)
    generators = _generators(1)
    drawn = {sample(logits, SamplingParams(top_k=2), generators).tokens.item() for _ in range(200)}
    assert drawn == {0, 1}
    drawn = {sample(logits, SamplingParams(top_p=0.7), generators).tokens.item() for _ in range(200)}
    assert drawn == {0, 1}  # 0.5 < 0.7 so the second token is needed, the third is not
    drawn = {sample(logits, SamplingParams(top_p=0.4), generators).tokens.item() for _ in range(50)}
    assert drawn == {0}
    only = sample(logits, SamplingParams(temperature=2.0, top_k=1), generators)
    assert only.tokens.tolist() == [0] and only.logprobs.tolist() == [0.0]  # renormalised: p = 1
    close(only.raw_logprobs, torch.log(torch.tensor([0.5])), scale=1)


def test_processed_logprobs_are_those_of_the_truncated_renormalised_distribution():
    logits = torch.randn(6, 40, generator=torch.Generator().manual_seed(0)) * 3
    params = SamplingParams(temperature=0.7, top_k=12, top_p=0.8)
    generators = _generators(6)
    for _ in range(5):
        out = sample(logits, params, generators)
        expected = [hand_logprob(row, t, 0.7, 12, 0.8) for row, t in zip(logits.tolist(), out.tokens.tolist())]
        close(out.logprobs, torch.tensor(expected, dtype=torch.float32), scale=logits.abs().max().item() / 0.7)
        close(out.raw_logprobs, torch.log_softmax(logits, -1).gather(-1, out.tokens[:, None])[:, 0],
               scale=logits.abs().max().item())


def test_inverse_cdf_draws_in_proportion_and_never_a_zero_probability_token():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.2, 0.0]])
    assert inverse_cdf(probs, torch.tensor([0.0])).tolist() == [1]
    assert inverse_cdf(probs, torch.tensor([0.5])).tolist() == [3]
    assert inverse_cdf(probs, torch.tensor([1.0 - EPS / 2])).tolist() == [4]  # not the zero tail
    assert inverse_cdf(probs, torch.tensor([1.0])).tolist() == [4]  # even at u = total
    draws = 4000
    generators = _generators(1, seed=7)
    counts = torch.zeros(6)
    for _ in range(draws):
        counts[sample(probs.log(), SamplingParams(), generators).tokens] += 1
    sigma = (draws * probs[0] * (1 - probs[0])).sqrt()
    assert ((counts - draws * probs[0]).abs() <= 4 * sigma).all() and counts[[0, 2, 5]].sum() == 0


def test_sample_seeds_depend_on_the_whole_triple():
    seeds = {sample_seed(s, p, i) for s in range(3) for p in range(3) for i in range(3)}
    assert len(seeds) == 27 and sample_seed(1, 2, 3) == sample_seed(1, 2, 3)
    assert all(0 <= s < 2**64 for s in seeds)


def test_sampling_params_are_validated():
    for bad in (dict(temperature=-1.0), dict(top_p=0.0), dict(top_k=-2), dict(repetition_penalty=0.0),
                dict(max_new_tokens=0)):
        with pytest.raises(ValueError, match=f"{next(iter(bad))} must be"):
            SamplingParams(**bad)
    with pytest.raises(ValueError, match="stop entries"):
        SamplingParams(stop=("",))
    assert SamplingParams(stop=["</s>", 3]).stop == ("</s>", 3)
    with pytest.raises(ValueError, match="repetition penalty needs"):
        sample(torch.zeros(1, 4), SamplingParams(repetition_penalty=1.2), _generators(1))


@pytest.fixture(scope="module")
def tiny_gemma(tiny_checkpoints):
    from transformers import AutoTokenizer

    path = tiny_checkpoints["gemma3"]
    return load_hf(path), AutoTokenizer.from_pretrained(path)


PROMPTS = [
    "hello world, how are you today?",
    "ab",
    "a much longer prompt than the sliding window of eight",
]


def test_seeded_sampling_is_reproducible(tiny_gemma):
    model, tokenizer = tiny_gemma
    a = generate(model, tokenizer, PROMPTS, max_new_tokens=12, temperature=1.0, seed=3)
    b = generate(model, tokenizer, PROMPTS, max_new_tokens=12, temperature=1.0, seed=3)
    c = generate(model, tokenizer, PROMPTS, max_new_tokens=12, temperature=1.0, seed=4)
    assert a.token_ids == b.token_ids and a.logprobs == b.logprobs and a.raw_logprobs == b.raw_logprobs
    assert a.token_ids != c.token_ids


def test_n_samples_and_argument_checks(tiny_gemma):
    model, tokenizer = tiny_gemma
    out = generate(model, tokenizer, PROMPTS[:2], max_new_tokens=5, n=3, seed=1)
    assert out.prompt_index == [0, 0, 0, 1, 1, 1] and out.sample_index == [0, 1, 2, 0, 1, 2]
    assert out.prompt_ids[3] == out.prompt_ids[5] != out.prompt_ids[0]
    assert len({tuple(t) for t in out.token_ids[:3]}) > 1  # different samples of one prompt
    with pytest.raises(ValueError, match="n must be"):
        generate(model, tokenizer, PROMPTS, max_new_tokens=2, n=0)
    with pytest.raises(ValueError, match="prompt_index has 1 entries for 3 prompts"):
        generate(model, tokenizer, PROMPTS, max_new_tokens=2, prompt_index=[4])


def test_logprobs_match_a_full_forward(tiny_gemma):
    """What RL needs: `raw_logprobs` equal the trainer's recomputation (temperature 1, full
    vocabulary), and `logprobs` the same forward's logits put through temperature, top-k and
    top-p and renormalised (the distribution the token was drawn from)."""
    model, tokenizer = tiny_gemma
    out = generate(model, tokenizer, PROMPTS, max_new_tokens=10, temperature=0.7, top_k=20, top_p=0.9,
                   seed=1)
    for prompt, generated, logprobs, raw in zip(
        out.prompt_ids, out.token_ids, out.logprobs, out.raw_logprobs, strict=True
    ):
        logits = full_forward_logits(model, prompt, generated)
        scale = logits.abs().max().item() / 0.7
        close(raw, torch.log_softmax(logits, -1).gather(-1, torch.tensor(generated)[:, None])[:, 0], scale)
        close(logprobs, [hand_logprob(row, t, 0.7, 20, 0.9) for row, t in zip(logits.tolist(), generated)], scale)
        assert all(lp >= r for lp, r in zip(logprobs, raw))  # truncation only adds mass (T < 1 too)


def test_greedy_processed_logprobs_are_zero(tiny_gemma):
    model, tokenizer = tiny_gemma
    out = generate(model, tokenizer, PROMPTS, max_new_tokens=6, temperature=0)
    assert all(lp == 0.0 for row in out.logprobs for lp in row)
    assert all(r < 0 for row in out.raw_logprobs for r in row)


def test_rows_do_not_depend_on_their_batch(tiny_gemma):
    model, tokenizer = tiny_gemma
    batched = generate(model, tokenizer, PROMPTS, max_new_tokens=10, temperature=0)
    for i, prompt in enumerate(PROMPTS):
        alone = generate(model, tokenizer, [prompt], max_new_tokens=10, temperature=0)
        assert alone.token_ids[0] == batched.token_ids[i]


def test_per_sequence_stop(tiny_gemma):
    model, tokenizer = tiny_gemma
    free = generate(model, tokenizer, PROMPTS, max_new_tokens=16, temperature=0)
    stop_token = free.token_ids[0][3]  # a token row 0 produces at step 4
    out = generate(model, tokenizer, PROMPTS, max_new_tokens=16, temperature=0, stop=[stop_token])
    assert out.finish_reasons[0] == "stop"
    assert out.token_ids[0] == free.token_ids[0][: free.token_ids[0].index(stop_token) + 1]
    for got, full in zip(
        out.token_ids[1:], free.token_ids[1:], strict=True
    ):  # rows continue after row 0 left
        assert got == (full[: full.index(stop_token) + 1] if stop_token in full else full)
    text = free.texts[1]
    if len(text) >= 4:
        stop_string = text[2:4]
        out = generate(
            model, tokenizer, PROMPTS, max_new_tokens=16, temperature=0, stop=[stop_string]
        )
        assert out.finish_reasons[1] == "stop" and stop_string not in out.texts[1]


def test_prompt_forms(tiny_gemma):
    """Message lists go through `render` (the training `ChatRenderer` in RL and evaluation), so
    generation sees exactly the prompt ids training computes log-probs over; there is no second
    path through the chat template."""
    model, tokenizer = tiny_gemma
    renderer = ChatRenderer(tokenizer)
    calls = []

    def render(messages: list[dict]) -> list[int]:
        calls.append(messages)
        return renderer.render_prompt(PromptExample(messages)).input_ids

    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    expected = renderer.render_prompt(PromptExample(messages)).input_ids
    out = generate(model, tokenizer, [messages, [5, 6, 7], "plain"], max_new_tokens=2, temperature=0,
                   render=render)
    assert calls == [messages] and out.prompt_ids[0] == expected
    assert out.prompt_ids[1] == [5, 6, 7]
    assert out.prompt_ids[2] == tokenizer("plain")["input_ids"]
    with pytest.raises(ValueError, match="pass render="):
        generate(model, tokenizer, [messages], max_new_tokens=2, temperature=0)
    special = [{"role": "user", "content": "a <|im_end|> inside"}]  # the training rules apply
    with pytest.raises(ValueError, match="special"):
        generate(model, tokenizer, [special], max_new_tokens=2, render=render)
    with pytest.raises(ValueError, match="empty"):
        generate(model, tokenizer, [[]], max_new_tokens=2)


def test_generation_config_is_read_once(tiny_checkpoints, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    directory = Path(shutil.copytree(tiny_checkpoints["llama"], tmp_path / "llama"))
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 9]}))
    model, tokenizer = load_hf(directory), AutoTokenizer.from_pretrained(directory)
    reads = []
    read_text = Path.read_text

    def counting(path, *args, **kwargs):
        if path.name == "generation_config.json":
            reads.append(path)
        return read_text(path, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", counting)
    assert default_eos_ids(model, tokenizer) == {7, 9, tokenizer.eos_token_id}
    for _ in range(3):
        generate(model, tokenizer, ["ab"], max_new_tokens=2, temperature=0)
    assert len(reads) == 1


def test_packed_prefill_matches_left_padded(tiny_gemma):
    model, tokenizer = tiny_gemma
    left = generate(model, tokenizer, PROMPTS, max_new_tokens=10, temperature=0.8, seed=2)
    packed = generate(model, tokenizer, PROMPTS, max_new_tokens=10, temperature=0.8, seed=2,
                      prefill="packed")
    assert packed.token_ids == left.token_ids
    for kind in ("logprobs", "raw_logprobs"):
        for a, b in zip(getattr(packed, kind), getattr(left, kind), strict=True):
            close(a, b, scale=max(map(abs, b)))
    with pytest.raises(ValueError, match="prefill"):
        generate(model, tokenizer, PROMPTS, max_new_tokens=2, prefill="right")


def test_repetition_penalty_is_the_transformers_one():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=generator)
    ids = torch.randint(0, 50, (3, 7), generator=generator)
    seen = torch.zeros(3, 50, dtype=torch.bool).scatter(1, ids, True)
    expected = RepetitionPenaltyLogitsProcessor(1.3)(ids, logits.clone())
    torch.testing.assert_close(penalise_repeats(logits, seen, 1.3), expected, atol=0, rtol=0)


def test_greedy_with_repetition_penalty_matches_transformers(tiny_gemma, tiny_checkpoints):
    """Prompt and generated tokens are both penalised, row by row, as in `transformers`; rows that
    finish early leave the batch without disturbing the others."""
    from transformers import AutoModelForCausalLM

    model, tokenizer = tiny_gemma
    reference = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["gemma3"], dtype=torch.float32)
    plain = generate(model, tokenizer, PROMPTS, max_new_tokens=12, temperature=0)
    out = generate(model, tokenizer, PROMPTS, max_new_tokens=12, temperature=0, repetition_penalty=1.5)
    assert out.token_ids != plain.token_ids
    for prompt, ours in zip(out.prompt_ids, out.token_ids, strict=True):
        theirs = reference.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                                    repetition_penalty=1.5)[0, len(prompt):].tolist()
        assert ours == theirs[: len(ours)]
