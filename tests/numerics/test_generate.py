"""Greedy generation equals transformers' `generate`, token for token, with the prompts rendered by
the training `ChatRenderer` (so its ids also equal the tokenizer's chat template's)."""

import pytest
import torch

from posttrain.data.chat import ChatRenderer
from posttrain.data.rows import PromptExample
from posttrain.models.generate import generate
from posttrain.models.hf import load_hf

CHAT_QUESTIONS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis in one sentence.",
    "What is 17 times 23?",
    "Give me three tips for better sleep.",
    "Who wrote Romeo and Juliet?",
    "Translate 'good morning' into Spanish.",
    "What is a prime number?",
)


def transformers_greedy(model_dir, prompts, max_new_tokens: int, eos: set[int]) -> list[list[int]]:
    """transformers' greedy continuation of each prompt (left-padded batch), cut after EOS."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    batch = tokenizer.apply_chat_template(
        list(prompts),
        add_generation_prompt=True,
        tokenize=True,
        padding=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = reference.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
    continuations = []
    for row in out[:, batch["input_ids"].shape[1] :].tolist():
        end = next((i for i, t in enumerate(row) if t in eos), len(row) - 1)
        continuations.append(row[: end + 1])
    return continuations


def training_renderer(tokenizer):
    """What RL and evaluation pass as `render`: the training renderer's prompt ids."""
    renderer = ChatRenderer(tokenizer)
    return lambda messages: renderer.render_prompt(PromptExample(messages)).input_ids


def template_ids(tokenizer, prompts) -> list[list[int]]:
    """The tokenizer's own chat-template ids with the generation prompt."""
    options = dict(add_generation_prompt=True, tokenize=True, return_dict=True)
    return [list(tokenizer.apply_chat_template(p, **options)["input_ids"]) for p in prompts]


@pytest.fixture
def one_thread():
    """Decoding is many small ops; one thread keeps it fast when other jobs share the 2 cores
    (two spinning OpenMP threads then slow it down several times)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_greedy_matches_transformers_on_smollm2(smollm2_dir, one_thread):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    prompts = [[{"role": "user", "content": q}] for q in CHAT_QUESTIONS]
    ours = generate(load_hf(smollm2_dir), tokenizer, prompts, max_new_tokens=32, temperature=0,
                    render=training_renderer(tokenizer))
    expected = transformers_greedy(smollm2_dir, prompts, 32, {tokenizer.eos_token_id})
    assert ours.prompt_ids == template_ids(tokenizer, prompts)
    assert ours.token_ids == expected
    assert ours.texts[0] == "The capital of France is Paris."
    assert all(
        len(t) == 32 or r == "stop"
        for t, r in zip(ours.token_ids, ours.finish_reasons, strict=True)
    )


@pytest.mark.parametrize("prefill", ["left", "packed"])
def test_greedy_matches_transformers_on_tiny_families(tiny_checkpoint, prefill, max_new_tokens=24):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    prompts = [[{"role": "user", "content": q}] for q in CHAT_QUESTIONS[:4]]
    ours = generate(
        load_hf(tiny_checkpoint),
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        temperature=0,
        prefill=prefill,
        render=training_renderer(tokenizer),
    )
    expected = transformers_greedy(
        tiny_checkpoint, prompts, max_new_tokens, {tokenizer.eos_token_id}
    )
    assert ours.prompt_ids == template_ids(tokenizer, prompts)
    assert ours.token_ids == expected
