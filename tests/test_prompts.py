"""Tests for rpttrain/prompts.py: templates, chat rendering with a tiny offline tokenizer, files.

Run: .venv/bin/python -m pytest -q tests/test_prompts.py
"""

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from rpttrain.prompts import (
    ANSWER_FORMATS,
    PLACEHOLDER,
    PROMPT_FORMATS,
    PromptFormat,
    build_messages,
    extract_verbatim,
    get_extract,
    load_prompt_format,
    render_prompt,
)
from rpttrain.reward import extract_prediction

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
HOSTILE_CONTEXT = "Let $x = \\frac{a}{b}$ and {context} and {0} {} {{ }} %s \\boxed{y}"


@pytest.fixture(scope="module")
def chat_tokenizer():
    vocab = {"[UNK]": 0, "<|im_start|>": 1, "<|im_end|>": 2, "x": 3}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    tokenizer.chat_template = CHATML
    return tokenizer


@pytest.mark.parametrize("name", sorted(PROMPT_FORMATS))
def test_every_format_renders_hostile_context_verbatim(name):
    fmt = PROMPT_FORMATS[name]
    text = render_prompt(fmt, HOSTILE_CONTEXT)
    assert text.count(HOSTILE_CONTEXT) == 1
    if fmt.uses_chat:
        (user,) = [m for m in build_messages(fmt, HOSTILE_CONTEXT) if m["role"] == "user"]
        # The placeholder was filled exactly once: only the context's own "{context}" remains.
        assert user["content"].count(PLACEHOLDER) == 1
        # (a masked format's {context_after} is filled with nothing when the task has none)
        assert user["content"] == fmt.user_template.replace("{context_after}", "").replace(PLACEHOLDER, HOSTILE_CONTEXT)
        assert text.startswith("User: ") and text.endswith("\n\nAssistant:")
        # answer formats hand the whole completion to the math reward, which reads the answer itself
        assert fmt.extract is (extract_verbatim if name in ANSWER_FORMATS else extract_prediction)


def test_answer_format_asks_for_a_boxed_final_answer():
    template = PROMPT_FORMATS["answer"].user_template
    assert template.startswith(PLACEHOLDER) and template.count(PLACEHOLDER) == 1
    assert "final answer within \\boxed{}" in template


@pytest.mark.parametrize("name", ["v0", "v2", "v6"])
def test_chat_templates_ask_for_a_boxed_token(name):
    template = PROMPT_FORMATS[name].user_template
    assert template.count(PLACEHOLDER) == 1
    assert "\\boxed{}" in template
    assert "\\boxed{ para}" in template and "\\boxed{ =}" in template
    assert "\\text{}" in template


def test_template_specifics():
    assert PROMPT_FORMATS["v0"].user_template.startswith("### Context\n{context}\n")
    assert "```\n{context}\n```" in PROMPT_FORMATS["v2"].user_template
    assert "candidate" in PROMPT_FORMATS["v6"].user_template


def test_chat_rendering_with_a_real_chat_template(chat_tokenizer):
    text = render_prompt(PROMPT_FORMATS["v0"], HOSTILE_CONTEXT, chat_tokenizer)
    assert text.startswith("<|im_start|>user\n### Context\n")
    assert HOSTILE_CONTEXT in text
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_system_message_goes_first(chat_tokenizer):
    fmt = PromptFormat("sys", "Be brief.", "Text: {context}", True, extract_prediction)
    assert build_messages(fmt, "a{b}") == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Text: a{b}"},
    ]
    assert render_prompt(fmt, "a{b}") == "System: Be brief.\n\nUser: Text: a{b}\n\nAssistant:"
    assert render_prompt(fmt, "a{b}", chat_tokenizer).startswith("<|im_start|>system\nBe brief.<|im_end|>\n")


def test_tokenizer_without_chat_template_falls_back_to_plain_text(chat_tokenizer):
    fmt = PROMPT_FORMATS["v0"]
    plain = PreTrainedTokenizerFast(tokenizer_object=chat_tokenizer.backend_tokenizer, unk_token="[UNK]")
    assert not getattr(plain, "chat_template", None)
    assert render_prompt(fmt, "x", plain) == render_prompt(fmt, "x")


def test_continuation_format_is_the_raw_context(chat_tokenizer):
    fmt = PROMPT_FORMATS["continuation"]
    assert not fmt.uses_chat
    assert render_prompt(fmt, HOSTILE_CONTEXT) == HOSTILE_CONTEXT
    assert render_prompt(fmt, HOSTILE_CONTEXT, chat_tokenizer) == HOSTILE_CONTEXT
    assert fmt.extract is extract_verbatim
    assert fmt.extract(" para \\boxed{x}") == " para \\boxed{x}"
    assert fmt.extract("") == ""
    with pytest.raises(ValueError, match="raw text"):
        build_messages(fmt, "x")


def test_rlp_format_is_the_context_then_an_opened_thought(smollm2_tokenizer):
    """The rlp prompt's ids are exactly the context's ids, then " <think>"'s (tokenized apart), the
    context losing its start to fit; the guess is what follows </think>."""
    from rpttrain.prompts import build_prompt_ids

    fmt = PROMPT_FORMATS["rlp"]
    assert not fmt.uses_chat and fmt.thought == (" <think>", "</think>")
    assert render_prompt(fmt, HOSTILE_CONTEXT) == HOSTILE_CONTEXT + " <think>"
    tok = smollm2_tokenizer
    context = "Photosynthesis is the process plants use to make their own food using"
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    tag = tok(" <think>", add_special_tokens=False)["input_ids"]
    assert build_prompt_ids(fmt, context, tok, 1000) == ctx + tag
    assert build_prompt_ids(fmt, context, tok, len(tag) + 3) == ctx[-3:] + tag
    with pytest.raises(ValueError, match="longer than max_prompt_tokens"):
        build_prompt_ids(fmt, context, tok, len(tag))
    assert fmt.extract(" it needs light.</think> sunlight") == " sunlight"
    assert fmt.extract(" it needs light") is None


def test_chat_format_needs_the_placeholder_once():
    with pytest.raises(ValueError, match="exactly once"):
        PromptFormat("bad", None, "no placeholder", True, extract_prediction)
    with pytest.raises(ValueError, match="exactly once"):
        PromptFormat("bad", None, "{context} {context}", True, extract_prediction)


def test_load_builtin_and_unknown():
    assert load_prompt_format("v6") is PROMPT_FORMATS["v6"]
    with pytest.raises(ValueError, match="v0, v2, v6, continuation"):
        load_prompt_format("v1")


def test_load_template_file(tmp_path, chat_tokenizer):
    path = tmp_path / "mine.txt"
    path.write_text("Guess the next token of:\n{context}\nAnswer in \\boxed{}.", encoding="utf-8")
    fmt = load_prompt_format(str(path))
    assert fmt.name == f"file:{path}"
    assert fmt.uses_chat and fmt.extract is extract_prediction
    assert load_prompt_format(fmt.name) == fmt
    text = render_prompt(fmt, HOSTILE_CONTEXT, chat_tokenizer)
    assert f"Guess the next token of:\n{HOSTILE_CONTEXT}\nAnswer" in text
    assert get_extract(fmt.name) is extract_prediction


@pytest.mark.parametrize("body, count", [("no placeholder here", 0), ("{context} and {context}", 2)])
def test_template_file_errors_name_the_file(tmp_path, body, count):
    path = tmp_path / "bad.txt"
    path.write_text(body, encoding="utf-8")
    with pytest.raises(ValueError, match=f"bad.txt.*found it {count} times"):
        load_prompt_format(str(path))


def test_get_extract():
    assert get_extract("v0") is extract_prediction
    assert get_extract("continuation") is extract_verbatim
    assert get_extract("file:/not/here.txt") is extract_prediction
    with pytest.raises(ValueError, match="unknown prompt format"):
        get_extract("v9")
