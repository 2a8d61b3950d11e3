"""Fixtures for data tests: real and tiny tokenizers, small data files."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from tests.tiny_models import build_byte_tokenizer

# SmolLM2's ChatML with `{% generation %}` around each assistant reply and its end token.
GENERATION_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ message['content'] + '<|im_end|>' + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# ChatML that drops the reasoning (up to `</think>`) of every assistant turn but the last.
REWRITING_TEMPLATE = (
    "{% for message in messages %}{% set content = message['content'] %}"
    "{% if message['role'] == 'assistant' and not loop.last %}"
    "{% set content = content.split('</think>')[-1].lstrip() %}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + content + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="session")
def smol_tok(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_dir))


def _with_template(tok, template: str):
    tok = copy.deepcopy(tok)
    tok.chat_template = template
    return tok


@pytest.fixture(scope="session")
def generation_tok(smol_tok):
    return _with_template(smol_tok, GENERATION_TEMPLATE)


@pytest.fixture(scope="session")
def rewriting_tok(smol_tok):
    return _with_template(smol_tok, REWRITING_TEMPLATE)


@pytest.fixture(scope="session")
def byte_tok():
    return build_byte_tokenizer()


@pytest.fixture(scope="session")
def byte_tok_dir(tmp_path_factory, byte_tok) -> Path:
    out = tmp_path_factory.mktemp("byte_tok")
    byte_tok.save_pretrained(out)
    return out


def write_jsonl(path: Path, rows: list) -> Path:
    with open(path, "w") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


def qa_rows(n: int, tag: str = "q", seed: int = 0) -> list[dict]:
    """GSM8K-shaped rows of varied lengths with unique text."""
    import random

    rng = random.Random(seed)
    return [
        {
            "question": f"{tag}{i}: " + "what is this? " * rng.randint(1, 6),
            "answer": f"answer {tag}{i} " + "because. " * rng.randint(1, 12),
        }
        for i in range(n)
    ]
