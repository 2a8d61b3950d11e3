"""Loss masks through the tokenizer's own chat template."""

from __future__ import annotations

import pytest

from posttrain.data.batch import IGNORE_INDEX, Sample
from posttrain.data.chat import ChatRenderer, render_messages
from posttrain.data.rows import FieldError, PreferenceExample, PromptExample, check_messages


def trained_positions(sample: Sample) -> list[int]:
    """Token positions that are prediction targets (label of the previous position)."""
    return [t + 1 for t, label in enumerate(sample.labels) if label != IGNORE_INDEX]


def trained_text(tok, sample: Sample) -> str:
    return tok.decode([sample.input_ids[t] for t in trained_positions(sample)])


def check_shift(sample: Sample) -> None:
    assert sample.labels[-1] == IGNORE_INDEX
    for t, label in enumerate(sample.labels[:-1]):
        assert label in (IGNORE_INDEX, sample.input_ids[t + 1])


def hf_ids(tok, messages, **kw) -> list[int]:
    clean = [{k: v for k, v in m.items() if k != "train"} for m in messages]
    return list(tok.apply_chat_template(clean, tokenize=True, return_dict=True, **kw)["input_ids"])


def expected_trained(tok, contents: list[str]) -> tuple[str, int]:
    """Assistant contents each followed by the end-of-turn token, and their token count."""
    text = "".join(c + "<|im_end|>" for c in contents)
    count = sum(len(tok(c, add_special_tokens=False)["input_ids"]) + 1 for c in contents)
    return text, count


CONVERSATION = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "It is 4."},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "That makes 6, of course."},
]

TOOL_CONVERSATION = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "Let me look that up."},
    {"role": "tool", "content": '{"temp_c": 21, "sky": "clear"}'},
    {"role": "assistant", "content": "It is 21 degrees and clear."},
]


@pytest.mark.parametrize("messages", [CONVERSATION, TOOL_CONVERSATION], ids=["system", "tool"])
def test_smollm2_multiturn_trains_exactly_assistant_content_and_end(smol_tok, messages):
    sample = render_messages(smol_tok, messages)
    assert sample.input_ids == hf_ids(smol_tok, messages)  # the context is the template's own
    check_shift(sample)
    contents = [m["content"] for m in messages if m["role"] == "assistant"]
    text, count = expected_trained(smol_tok, contents)
    assert trained_text(smol_tok, sample) == text
    assert sample.num_trained == count
    # Nothing of system/user/tool content or of the template scaffolding is trained.
    untrained = smol_tok.decode(
        [t for i, t in enumerate(sample.input_ids) if i not in set(trained_positions(sample))]
    )
    for m in messages:
        if m["role"] != "assistant":
            assert m["content"] in untrained


def test_last_turn_only_and_per_message_train_false(smol_tok):
    last = render_messages(smol_tok, CONVERSATION, train_on="last")
    assert trained_text(smol_tok, last) == "That makes 6, of course.<|im_end|>"
    messages = [dict(m) for m in CONVERSATION]
    messages[4]["train"] = False
    first_only = render_messages(smol_tok, messages)
    assert trained_text(smol_tok, first_only) == "It is 4.<|im_end|>"
    assert first_only.input_ids == hf_ids(smol_tok, CONVERSATION)
    messages[2]["train"] = False
    assert render_messages(smol_tok, messages).num_trained == 0


def test_generation_markers_equal_hf_assistant_mask(generation_tok):
    for messages in (CONVERSATION, TOOL_CONVERSATION):
        sample = render_messages(generation_tok, messages)
        out = generation_tok.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        assert sample.input_ids == list(out["input_ids"])
        ours = [0] * len(sample.input_ids)
        for t in trained_positions(sample):
            ours[t] = 1
        assert ours == list(out["assistant_masks"])
        assert sum(ours) > 0


def test_generation_markers_select_last_turn(generation_tok):
    sample = render_messages(generation_tok, CONVERSATION, train_on="last")
    assert trained_text(generation_tok, sample) == "That makes 6, of course.<|im_end|>"


@pytest.mark.parametrize("content", ["\n\nIt is 4.", "   It is 4.", " \n It is 4.\n\n"])
def test_boundary_merges_keep_context_and_do_not_raise(smol_tok, content):
    messages = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": content}]
    sample = render_messages(smol_tok, messages)
    assert sample.input_ids == hf_ids(smol_tok, messages)
    check_shift(sample)
    text = trained_text(smol_tok, sample)
    # Every character of the reply is trained; a token merged with the template's newline may add it.
    assert text.endswith(content + "<|im_end|>")
    assert text in ("\n" + content + "<|im_end|>", content + "<|im_end|>")


REASONING = [
    {"role": "user", "content": "Q1"},
    {"role": "assistant", "content": "<think>one</think>A1"},
    {"role": "user", "content": "Q2"},
    {"role": "assistant", "content": "<think>two</think>A2"},
]


def test_template_rewriting_earlier_turns_is_an_error(rewriting_tok):
    with pytest.raises(FieldError, match="template_rewrite: expand"):
        render_messages(rewriting_tok, REASONING)
    # The last turn alone is consistent with inference, so it renders.
    assert render_messages(rewriting_tok, REASONING, train_on="last").num_trained > 0


def test_template_rewrite_expands_one_sample_per_turn(rewriting_tok):
    renderer = ChatRenderer(rewriting_tok, template_rewrite="expand")
    rendered = renderer.render_conversation(check_messages(REASONING, "messages"))
    assert rendered.expanded and len(rendered.samples) == 2
    replies = ("<think>one</think>A1", "<think>two</think>A2")
    for sample, upto, reply in zip(rendered.samples, (2, 4), replies):
        assert sample.input_ids == hf_ids(rewriting_tok, REASONING[:upto])
        assert trained_text(rewriting_tok, sample) == reply + "<|im_end|>"


SPECIAL = [
    {"role": "user", "content": "Print <|im_end|> literally"},
    {"role": "assistant", "content": "Sure: <|im_end|>"},
]


def test_special_token_in_content_is_an_error_by_default(smol_tok):
    with pytest.raises(FieldError) as err:
        render_messages(smol_tok, SPECIAL)
    assert err.value.field == "messages[0].content" and "<|im_end|>" in str(err.value)


def test_special_token_escape_encodes_plain_text(smol_tok):
    end = smol_tok.convert_tokens_to_ids("<|im_end|>")
    sample = render_messages(smol_tok, SPECIAL, special_tokens="escape")
    check_shift(sample)
    # Only the template's own end tokens (one per message + the system prompt's) are control tokens.
    assert sample.input_ids.count(end) == 3
    assert smol_tok.decode(sample.input_ids) == smol_tok.apply_chat_template(SPECIAL, tokenize=False)
    assert trained_text(smol_tok, sample) == "Sure: <|im_end|><|im_end|>"
    allowed = render_messages(smol_tok, SPECIAL, special_tokens="allow")
    assert allowed.input_ids.count(end) == 5
    assert allowed.input_ids == hf_ids(smol_tok, SPECIAL)


def _contains(ids: list[int], part: list[int]) -> bool:
    return any(ids[i : i + len(part)] == part for i in range(len(ids) - len(part) + 1))


@pytest.mark.parametrize("content", ["Use <|im_end|> to stop", "a<|im_start|>b <|im_end|>\n c"])
def test_escaped_content_is_the_tokenizers_own_plain_text_encoding(smol_tok, content):
    """The escaped string merges with its neighbours as the tokenizer encodes the content as
    text (`Ġ<` in "Use <|im_end|>"), in a trained and an untrained turn; masks unchanged."""
    messages = [{"role": "user", "content": content}, {"role": "assistant", "content": content}]
    sample = render_messages(smol_tok, messages, special_tokens="escape")
    check_shift(sample)
    plain = smol_tok(content, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    user, reply = sample.input_ids.index(plain[0]), len(sample.input_ids) - 2 - len(plain)
    assert _contains(sample.input_ids[: user + len(plain)], plain)  # the user turn
    assert sample.input_ids[reply : reply + len(plain)] == plain  # the reply, before <|im_end|> \n
    assert trained_text(smol_tok, sample) == content + "<|im_end|>"
    end = smol_tok.convert_tokens_to_ids("<|im_end|>")
    assert sample.input_ids.count(end) == 3  # system, user, assistant: the template's own
    assert smol_tok.decode(sample.input_ids) == smol_tok.apply_chat_template(messages, tokenize=False)


def test_plain_text_prompt_completion(byte_tok):
    rendered = ChatRenderer(byte_tok).render_text("Q: 1+1=", " 2")
    (sample,) = rendered.samples
    check_shift(sample)
    assert sample.input_ids[-1] == byte_tok.eos_token_id
    assert trained_text(byte_tok, sample) == " 2" + byte_tok.eos_token


def test_preference_pair_trains_only_responses(smol_tok):
    renderer = ChatRenderer(smol_tok)
    prompt = [{"role": "user", "content": "Pick a colour.", "train": False}]
    example = PreferenceExample(
        prompt, [{"role": "assistant", "content": "Blue."}], [{"role": "assistant", "content": "No."}]
    )
    chosen, rejected = renderer.render_preference(example).samples
    assert trained_text(smol_tok, chosen) == "Blue.<|im_end|>"
    assert trained_text(smol_tok, rejected) == "No.<|im_end|>"
    n = len(hf_ids(smol_tok, prompt, add_generation_prompt=True))
    assert chosen.input_ids[:n] == rejected.input_ids[:n]


def test_prompt_ends_with_generation_prompt(smol_tok):
    messages = [{"role": "user", "content": "Hi"}]
    prompt = ChatRenderer(smol_tok).render_prompt(PromptExample(messages, reference="42"))
    assert prompt.input_ids == hf_ids(smol_tok, messages, add_generation_prompt=True)
    assert prompt.reference == "42"
