import pytest
import torch

from posttrain.models.generate import SamplingParams, generate, penalise_repeats, sample
from posttrain.models.hf import load_hf


def test_sample_greedy_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    tokens, logprobs = sample(logits, SamplingParams(temperature=0), None)
    assert tokens.tolist() == [0] and logprobs.item() == pytest.approx(
        torch.log(torch.tensor(0.5)).item()
    )
    generator = torch.Generator().manual_seed(0)
    drawn = {sample(logits, SamplingParams(top_k=2), generator)[0].item() for _ in range(200)}
    assert drawn == {0, 1}
    drawn = {sample(logits, SamplingParams(top_p=0.7), generator)[0].item() for _ in range(200)}
    assert drawn == {0, 1}  # 0.5 < 0.7 so the second token is needed, the third is not
    drawn = {sample(logits, SamplingParams(top_p=0.4), generator)[0].item() for _ in range(50)}
    assert drawn == {0}
    # log-probs are those of the temperature-scaled distribution, before truncation
    _, lp = sample(logits, SamplingParams(temperature=2.0, top_k=1), generator)
    assert lp.item() == pytest.approx(torch.log_softmax(logits / 2.0, -1)[0, 0].item(), abs=1e-6)


def test_sampling_params_are_validated():
    for bad in (dict(temperature=-1.0), dict(top_p=0.0), dict(top_k=-2), dict(repetition_penalty=0.0)):
        with pytest.raises(ValueError, match=f"{next(iter(bad))} must be"):
            SamplingParams(**bad)


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
    assert a.token_ids == b.token_ids and a.logprobs == b.logprobs
    assert a.token_ids != c.token_ids


def test_logprobs_match_a_full_forward(tiny_gemma):
    """What RL needs: the returned log-probs equal the trainer's recomputation."""
    model, tokenizer = tiny_gemma
    out = generate(model, tokenizer, PROMPTS, max_new_tokens=10, temperature=0.7, top_k=20, seed=1)
    for prompt, generated, logprobs in zip(
        out.prompt_ids, out.token_ids, out.logprobs, strict=True
    ):
        ids = torch.tensor([prompt + generated])
        logits = model.logits(model(ids))[0, len(prompt) - 1 : -1].float() / 0.7
        expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(generated)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(logprobs), expected, atol=1e-4, rtol=0)


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
    model, tokenizer = tiny_gemma
    messages = [{"role": "user", "content": "hi"}]
    out = generate(model, tokenizer, [messages, [5, 6, 7]], max_new_tokens=2, temperature=0)
    assert (
        out.prompt_ids[0]
        == tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)[
            "input_ids"
        ]
    )
    assert out.prompt_ids[1] == [5, 6, 7]
    with pytest.raises(ValueError, match="empty"):
        generate(model, tokenizer, [[]], max_new_tokens=2)


def test_packed_prefill_matches_left_padded(tiny_gemma):
    model, tokenizer = tiny_gemma
    left = generate(model, tokenizer, PROMPTS, max_new_tokens=10, temperature=0)
    packed = generate(model, tokenizer, PROMPTS, max_new_tokens=10, temperature=0, prefill="packed")
    assert packed.token_ids == left.token_ids
    for a, b in zip(packed.logprobs, left.logprobs, strict=True):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-5, rtol=0)
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
