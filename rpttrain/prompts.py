"""Prompt formats: how an RPT context is shown to the policy and how its guess is read back.

A ``PromptFormat`` pairs a prompt with the function that extracts the guess from a
completion, so a format cannot be scored with the wrong extractor. Built-ins:

- ``v0`` (the default for reasoning models): the context under a "### Context"
  heading, then the task: reason step by step, answer the next token in
  ``\\boxed{}``. Paper App. D, Table 8, in our own words.
- ``v2``: the same task with the context in a fenced code block.
- ``v6``: asks for several candidate tokens, each with a short reason, before the
  boxed choice.
- ``answer``: for answer tasks (``rpt answer-tasks``, ``--reward math``): the problem,
  then the instruction R1-distilled models are evaluated with on math ("Please reason step
  by step, and put your final answer within \\boxed{}."). The guess is the completion text
  verbatim: math-verify reads the final answer itself (``rpttrain.reward.math_reward``).
- ``continuation``: for base or small models with no habit of reasoning in
  ``\\boxed{}`` (SmolLM2-135M boxes 0 of 80 answers under ``v0``): the prompt is the
  raw context, no chat template and no instructions, and the guess is the
  completion text verbatim.
- ``rlp``: RLP's shape (arXiv 2510.01265, Fig. 1: "... use to make their own food using
  <think> The sentence describes ... </think> sunlight"): the raw context, then `` <think>``;
  the policy writes a thought and closes it with ``</think>``; the guess is the text after
  the closing tag, verbatim (None when the thought never closes). The context and the
  opening tag are tokenized apart, so the prompt's ids are exactly the context's ids and
  then the tag's: `rpt train --objective rlp` scores the next token after the context alone
  with those same ids. Raw text, no chat template: the paper trains base models.

- ``sentence``, ``masked-sentence``, ``masked-span``: for the units of ``rpt make-tasks
  --unit`` (the next sentence, RLPT's ASR; the masked middle sentence, RLPT's MSR; a masked
  span of words, PretrainZero). The masked formats show the text before the mask, ``[MASK]``
  and the text after it (``{context_after}``) in one block; every one asks for the answer in
  ``\\boxed{}``. ``UNIT_FORMATS`` says which formats fit which unit.

A user's own template is a text file holding the placeholder ``{context}`` exactly
once, and ``{context_after}`` at most once (exactly once for the masked units); it renders as
a chat format with box extraction and is named ``file:<path>``.

The placeholders are filled in one pass over the template (``_fill``), never with
``str.format``: contexts are maths full of braces (``\\frac{a}{b}``), and a context
that itself contains the text ``{context}`` or ``{context_after}`` is left as it is.

Left out on purpose: few-shot examples, and a system message in the built-ins
(R1-distilled models are meant to be prompted without one; the field exists for
callers who build their own ``PromptFormat``). ``v2`` uses a plain triple-backtick
fence, so a context containing a triple backtick closes the fence early.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rptdata.errors import BadOption
from rpttrain.reward import extract_prediction

__all__ = [
    "ANSWER_FORMATS",
    "THINK_CLOSE",
    "THINK_OPEN",
    "extract_after_thought",
    "PLACEHOLDER",
    "PLACEHOLDER_AFTER",
    "PROMPT_FORMATS",
    "UNIT_FORMATS",
    "PromptFormat",
    "build_messages",
    "extract_verbatim",
    "get_extract",
    "load_prompt_format",
    "render_prompt",
]

PLACEHOLDER = "{context}"
PLACEHOLDER_AFTER = "{context_after}"
_FILE_PREFIX = "file:"
_PLACEHOLDERS = re.compile(r"\{context(?:_after)?\}")


def _fill(template: str, context: str, context_after: str | None) -> str:
    """The template with ``{context}`` and ``{context_after}`` filled in one pass, so text inside
    either is never taken for a placeholder.

    >>> _fill("a {context} b {context_after}", "{context_after}", "x")
    'a {context_after} b x'
    """
    return _PLACEHOLDERS.sub(lambda m: context if m.group(0) == PLACEHOLDER else (context_after or ""), template)


THINK_OPEN, THINK_CLOSE = " <think>", "</think>"


def extract_after_thought(completion: str) -> str | None:
    """The guess of the ``rlp`` format: what follows the thought's closing tag, verbatim.

    >>> extract_after_thought(" plants use light.</think> sunlight")
    ' sunlight'
    >>> extract_after_thought(" still thinking") is None
    True
    """
    if THINK_CLOSE not in completion:
        return None
    return completion.split(THINK_CLOSE, 1)[1]


def extract_verbatim(completion: str) -> str:
    """The guess of the ``continuation`` format: the completion text itself.

    An empty completion stays ``""``, which every reward scores 0.

    >>> extract_verbatim(" para")
    ' para'
    """
    return completion


@dataclass(frozen=True)
class PromptFormat:
    """One way of prompting for the next token.

    Fields:
        name: the built-in name, or ``file:<path>`` for a user template.
        system: an optional system message (chat formats only).
        user_template: the user message, with ``{context}`` exactly once; None for
            the raw ``continuation`` format, whose prompt is the context itself.
        uses_chat: True when the prompt is a chat conversation (rendered with the
            tokenizer's chat template); False when it is raw text.
        extract: turns a completion into the guess that the reward scores.
        thought: for raw formats that ask for a thought first, its (opening, closing) tags: the
            prompt is the context, then the opening tag (tokenized apart).
    """

    name: str
    system: str | None
    user_template: str | None
    uses_chat: bool
    extract: Callable[[str], str | None]
    thought: tuple[str, str] | None = None

    def __post_init__(self) -> None:
        if self.uses_chat and (self.user_template is None or self.user_template.count(PLACEHOLDER) != 1):
            raise BadOption(
                f"prompt format {self.name!r}: a chat format needs a user_template holding {PLACEHOLDER} exactly once"
            )
        if self.uses_chat and self.thought is not None:
            raise BadOption(f"prompt format {self.name!r}: a thought's tags go after a raw context, not a chat")
        if self.user_template is not None and self.user_template.count(PLACEHOLDER_AFTER) > 1:
            raise BadOption(f"prompt format {self.name!r}: {PLACEHOLDER_AFTER} may stand at most once")

    @property
    def masked(self) -> bool:
        """True when the format shows the text after the target (``{context_after}``)."""
        return self.user_template is not None and PLACEHOLDER_AFTER in self.user_template


_V0 = """### Context
{context}

### Task
Predict the next token that comes right after the context above. Think it through step by step and work out which token is the most probable one to come next. Then give only that token as your final answer, inside \\boxed{}.

The token may start with a space. For example, if the next token is " para" (with its leading space), answer \\boxed{ para}; if it is " =", answer \\boxed{ =}. Write the token exactly as it appears in the text, and do not wrap it in \\text{}."""

_V2 = """Here is the beginning of a text:

```
{context}
```

Predict the next token that comes right after the end of the text in the block above. Think it through step by step and work out which token is the most probable one to come next. Then give only that token as your final answer, inside \\boxed{}.

The token may start with a space. For example, if the next token is " para" (with its leading space), answer \\boxed{ para}; if it is " =", answer \\boxed{ =}. Write the token exactly as it appears in the text, and do not wrap it in \\text{}."""

_V6 = """### Context
{context}

### Task
Predict the next token that comes right after the context above. First list a few candidate next tokens, each with a short reason why it could come next. Then compare them, choose the most probable one, and give only that token as your final answer, inside \\boxed{}.

The token may start with a space. For example, if the next token is " para" (with its leading space), answer \\boxed{ para}; if it is " =", answer \\boxed{ =}. Write the token exactly as it appears in the text, and do not wrap it in \\text{}."""

_SENTENCE = """### Context
{context}

### Task
Predict the next sentence: the one that comes right after the context above. Think it through step by step and work out what the text most probably says next. Then give only that sentence as your final answer, inside \\boxed{}.

Write the sentence exactly as it would appear in the text, with its punctuation and any LaTeX as the text writes it, and do not wrap it in \\text{}."""

_MASKED_SENTENCE = """### Text
{context}[MASK]{context_after}

### Task
One sentence of the text above was replaced by [MASK]. Read the text before and after it, think it through step by step, and work out the missing sentence. Then give only that sentence as your final answer, inside \\boxed{}.

Write the sentence exactly as it would appear in the text, with its punctuation and any LaTeX as the text writes it, and do not wrap it in \\text{}."""

_MASKED_SPAN = """### Text
{context}[MASK]{context_after}

### Task
A few words of the text above (one to a handful, from one line) were replaced by [MASK]. Read the text before and after it, think it through step by step, and work out the missing words. Then give only those words as your final answer, inside \\boxed{}.

Write them exactly as they appear in the text, without the words around the mask, and do not wrap them in \\text{}."""

_ANSWER = """{context}

Please reason step by step, and put your final answer within \\boxed{}."""

PROMPT_FORMATS: dict[str, PromptFormat] = {
    "v0": PromptFormat("v0", None, _V0, True, extract_prediction),
    "v2": PromptFormat("v2", None, _V2, True, extract_prediction),
    "v6": PromptFormat("v6", None, _V6, True, extract_prediction),
    "continuation": PromptFormat("continuation", None, None, False, extract_verbatim),
    "rlp": PromptFormat("rlp", None, None, False, extract_after_thought, (THINK_OPEN, THINK_CLOSE)),
    "answer": PromptFormat("answer", None, _ANSWER, True, extract_verbatim),
    "sentence": PromptFormat("sentence", None, _SENTENCE, True, extract_prediction),
    "masked-sentence": PromptFormat("masked-sentence", None, _MASKED_SENTENCE, True, extract_prediction),
    "masked-span": PromptFormat("masked-span", None, _MASKED_SPAN, True, extract_prediction),
}
# the formats of answer tasks (a problem in, a final answer in \boxed{} out); the others are for next-token tasks
ANSWER_FORMATS = ("answer",)
# the built-in formats that fit each unit of `rpt make-tasks --unit` (rpttrain.data.check_task_fit
# refuses the others by name; a template file fits a masked unit when it holds {context_after})
UNIT_FORMATS: dict[str, tuple[str, ...]] = {
    "token": ("v0", "v2", "v6", "continuation"),
    "sentence": ("sentence", "continuation"),
    "masked-sentence": ("masked-sentence",),
    "span": ("masked-span",),
}


def _choices() -> str:
    return ", ".join(PROMPT_FORMATS) + f", or a path to a text file holding {PLACEHOLDER} once"


def load_prompt_format(name_or_path: str) -> PromptFormat:
    """A built-in format by name, or a chat format read from a template file.

    The file (``path`` or ``file:path``) must contain ``{context}`` exactly once;
    otherwise, and for a name that is neither built in nor an existing file,
    ValueError says why.

    >>> load_prompt_format("v0").name
    'v0'
    """
    if name_or_path in PROMPT_FORMATS:
        return PROMPT_FORMATS[name_or_path]
    path = name_or_path.removeprefix(_FILE_PREFIX)
    if not os.path.isfile(path):
        raise BadOption(f"unknown prompt format {name_or_path!r}; choose {_choices()}")
    with open(path, encoding="utf-8") as f:
        template = f.read()
    n = template.count(PLACEHOLDER)
    if n != 1:
        raise BadOption(
            f"prompt template file {path!r} must contain the placeholder {PLACEHOLDER} exactly once; found it {n} times"
        )
    if template.count(PLACEHOLDER_AFTER) > 1:
        raise BadOption(f"prompt template file {path!r} may contain {PLACEHOLDER_AFTER} at most once")
    return PromptFormat(_FILE_PREFIX + path, None, template, True, extract_prediction)


def get_extract(format_name: str) -> Callable[[str], str | None]:
    """The extractor for a format name, without reading any template file.

    Reward workers (verl, TRL) only know the format's name; every ``file:`` format
    uses box extraction, so the file need not exist where the reward runs.

    >>> get_extract("continuation")(" x")
    ' x'
    """
    if format_name in PROMPT_FORMATS:
        return PROMPT_FORMATS[format_name].extract
    if format_name.startswith(_FILE_PREFIX):
        return extract_prediction
    raise BadOption(f"unknown prompt format {format_name!r}; choose {_choices()}")


def build_messages(fmt: PromptFormat, context: str, context_after: str | None = None) -> list[dict[str, str]]:
    """The chat messages of a chat format: an optional system message, then the user turn.
    `context_after` fills ``{context_after}`` (the masked formats).

    >>> build_messages(PROMPT_FORMATS["v0"], "1 + 1")[0]["content"].splitlines()[:2]
    ['### Context', '1 + 1']
    """
    if not fmt.uses_chat or fmt.user_template is None:
        raise BadOption(f"prompt format {fmt.name!r} is raw text, not a chat; it has no messages")
    messages = [{"role": "system", "content": fmt.system}] if fmt.system is not None else []
    messages.append({"role": "user", "content": _fill(fmt.user_template, context, context_after)})
    return messages


def render_prompt(fmt: PromptFormat, context: str, tokenizer: Any = None, context_after: str | None = None) -> str:
    """The prompt string the policy sees.

    - ``continuation`` (raw formats): the context itself; ``rlp``: the context, then `` <think>``.
    - chat formats with a tokenizer that has a ``chat_template``:
      ``tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)``.
    - chat formats otherwise: a plain-text transcript, each message as
      ``"System: ..."`` / ``"User: ..."`` separated by a blank line, ending with
      ``"\\n\\nAssistant:"``.

    >>> render_prompt(PROMPT_FORMATS["continuation"], "x = \\\\frac{a}{b}")
    'x = \\\\frac{a}{b}'
    >>> render_prompt(PROMPT_FORMATS["v0"], "1 + 1").endswith("\\n\\nAssistant:")
    True
    """
    if not fmt.uses_chat:
        return context + (fmt.thought[0] if fmt.thought else "")
    messages = build_messages(fmt, context, context_after)
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    turns = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return "\n\n".join(turns) + "\n\nAssistant:"


def task_prompt_ids(fmt: PromptFormat, task: dict, tokenizer: Any, max_prompt_tokens: int) -> list[int]:
    """`build_prompt_ids` of a task row: its context, and its context_after when it has one."""
    return build_prompt_ids(fmt, task["context"], tokenizer, max_prompt_tokens, task.get("context_after"))


def build_prompt_ids(
    fmt: PromptFormat, context: str, tokenizer: Any, max_prompt_tokens: int, context_after: str | None = None
) -> list[int]:
    """Token ids of the rendered prompt, at most `max_prompt_tokens` long.

    A prompt that is too long loses the START of its context (the end, next to the token to
    predict, matters most): the raw format keeps the last tokens; chat formats re-render with the
    context's leading tokens dropped. When the whole context is gone and a masked format's
    `context_after` still does not fit, that loses its END (the text far after the mask).
    Special tokens come only from the chat template. A thought's opening tag is tokenized apart and
    follows the context's ids.
    """
    if fmt.thought is not None:
        tag = tokenizer(fmt.thought[0], add_special_tokens=False)["input_ids"]
        if len(tag) >= max_prompt_tokens:
            raise BadOption(f"prompt format {fmt.name!r} alone is longer than max_prompt_tokens={max_prompt_tokens}")
        return build_prompt_ids(PROMPT_FORMATS["continuation"], context, tokenizer, max_prompt_tokens - len(tag)) + tag
    ids = tokenizer(render_prompt(fmt, context, tokenizer, context_after), add_special_tokens=False)["input_ids"]
    if len(ids) <= max_prompt_tokens:
        return ids
    if not fmt.uses_chat:
        return ids[len(ids) - max_prompt_tokens :]
    ids = _shortened(fmt, tokenizer, max_prompt_tokens, context, lambda text: (text, context_after), keep_end=True)
    if ids is None and context_after:
        ids = _shortened(fmt, tokenizer, max_prompt_tokens, context_after, lambda text: ("", text), keep_end=False)
    if ids is None:
        raise BadOption(f"prompt format {fmt.name!r} alone is longer than max_prompt_tokens={max_prompt_tokens}")
    return ids


def _shortened(fmt, tokenizer, max_prompt_tokens: int, text: str, fill, keep_end: bool) -> list[int] | None:
    """The prompt with `text` (the context, or the text after the mask) cut token by token, from its
    start (`keep_end`) or its end, until it fits; None when even an empty `text` does not."""

    def prompt_ids(part: str) -> list[int]:
        context, after = fill(part)
        return tokenizer(render_prompt(fmt, context, tokenizer, after), add_special_tokens=False)["input_ids"]

    text_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    keep = max_prompt_tokens - (len(prompt_ids(text)) - len(text_ids))
    while keep > 0:
        ids = prompt_ids(tokenizer.decode(text_ids[len(text_ids) - keep :] if keep_end else text_ids[:keep]))
        if len(ids) <= max_prompt_tokens:
            return ids
        keep -= max(1, len(ids) - max_prompt_tokens)
    return None
