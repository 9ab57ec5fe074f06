"""Answer extraction and the RPT rewards: pure string functions, standard library only.

The policy reasons, then writes its guess of the next token inside ``\\boxed{}``
(RPT paper, Sec. 3.2). This module turns a completion into that guess and scores
the guess against the corpus continuation:

- ``extract_prediction``: the content of the last complete ``\\boxed{...}`` after
  the last ``</think>``.
- ``prefix_reward``: the paper's Eq. 3, "prefix matching". The guess must equal
  the continuation's first bytes and end on a token boundary, so it may cover one
  or several whole tokens, never part of one.
- ``first_token_reward``: App. A's first-token matching; only the exact first
  token counts.
- ``score_completions``: the batch form used by training, probe, eval and the
  verl/TRL wrappers, so the training reward and the eval metric cannot drift apart.

Rewards work on UTF-8 bytes, and ``boundaries`` are the cumulative byte lengths
of the continuation's tokens (``token_end_bytes`` in the task files), so a
byte-level BPE token that ends inside a multi-byte character is a boundary no
string guess can reach; such positions can only be won by covering more tokens.

Left out on purpose:

- The paper's ``dense`` and conditional-dense rewards (App. A) use the policy's
  probability of the predicted token when the guess is wrong. A string reward
  cannot see that probability, so they belong next to the log-probs in the
  training loop, not here.
- No whitespace stripping or normalisation of the guess: a leading space is part
  of the token (``\\boxed{ para}`` predicts " para"), and ``\\boxed{\\text{x}}``
  is compared verbatim (the prompts tell the model not to use ``\\text{}``).
- Only the literal spelling ``\\boxed{`` opens a box (not ``\\boxed {`` or
  ``\\fbox{``).

Run the examples with ``python -m doctest rpttrain/reward.py``.
"""

from __future__ import annotations

import re
from typing import Callable, Sequence

__all__ = [
    "REWARDS",
    "extract_prediction",
    "first_token_reward",
    "get_reward_fn",
    "prefix_reward",
    "score_completions",
]

_BOX = "\\boxed{"
_END_THINK = "</think>"
# One step of the brace scan: a box opening (group 1), a run of "{" (group 2), a run
# of "}" (group 3), or a run of brace-free "{...}" groups (no group; they cannot hold
# a box, since "\\boxed{" contains a brace). Runs keep hostile inputs fast.
_BRACE_SCAN = re.compile(r"(\\boxed\{)|(?:\{[^{}]*\})+|(\{+)|(\}+)")


def extract_prediction(completion: str) -> str | None:
    """Return the content of the last complete ``\\boxed{...}``, or None.

    Only the text after the last ``</think>`` is searched (the whole completion
    when there is none, e.g. for a model that does not think in tags). Braces are
    matched, so ``\\boxed{a{b}c}`` gives ``a{b}c``. The content is returned
    verbatim, leading spaces included.

    "Last" means the complete box whose closing brace comes last in the text:

    - nested boxes: the outermost wins, since it closes after the ones inside it
      (``\\boxed{a \\boxed{b}}`` gives ``a \\boxed{b}``);
    - a box that never closes (a truncated answer) is ignored, so the answer falls
      back to the last complete box, before it or nested inside it;
    - unmatched ``}`` outside any box are ignored.

    One forward scan with a stack: linear time even for megabytes of unclosed
    ``\\boxed{`` or stray braces. Never raises for a ``str``.

    >>> extract_prediction("<think>maybe \\\\boxed{ x}</think> so \\\\boxed{ para}")
    ' para'
    >>> extract_prediction("\\\\boxed{\\\\frac{a}{b}} then \\\\boxed{ =}")
    ' ='
    >>> extract_prediction("\\\\boxed{a \\\\boxed{b}}")
    'a \\\\boxed{b}'
    >>> extract_prediction("\\\\boxed{1} and \\\\boxed{2")
    '1'
    >>> extract_prediction("\\\\boxed{}")
    ''
    >>> extract_prediction("no answer") is None
    True
    """
    end_think = completion.rfind(_END_THINK)
    start = 0 if end_think < 0 else end_think + len(_END_THINK)
    best: tuple[int, int] | None = None  # (content start, closing brace) of the answer
    # Braces outside every box cannot change which boxes close, so whenever no box
    # is open, jump straight to the next box opening with str.find.
    i = completion.find(_BOX, start)
    while i != -1:
        content = i + len(_BOX)
        close = completion.find("}", content)
        if close != -1 and completion.find("{", content, close) == -1:
            best = (content, close)  # fast path: a box with no braces inside
            i = completion.find(_BOX, close)
            continue
        boxes = [content]  # content start of each open box, innermost last
        plain = [0]  # open plain "{" directly above each open box
        i = -1  # stays -1 if the text ends inside an unclosed box
        for m in _BRACE_SCAN.finditer(completion, content):
            s, e = m.span()
            kind = m.lastindex
            if kind == 1:  # \boxed{
                boxes.append(e)
                plain.append(0)
            elif kind == 2:  # a run of "{"
                plain[-1] += e - s
            elif kind == 3:  # a run of "}": closes plain braces first, then boxes, one by one
                while s < e:
                    if plain[-1] >= e - s:
                        plain[-1] -= e - s
                        break
                    s += plain.pop()
                    best = (boxes.pop(), s)
                    s += 1
                    if not boxes:
                        break
                if not boxes:
                    i = completion.find(_BOX, e)
                    break
            # kind None: brace-free "{...}" groups, which leave the stack as it was
    return None if best is None else completion[best[0] : best[1]]


def _utf8(text: str) -> bytes | None:
    """UTF-8 bytes of ``text``, or None when it holds lone surrogates."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return None


def prefix_reward(prediction: str | None, continuation: str, boundaries: Sequence[int]) -> float:
    """Prefix-matching reward (paper Eq. 3): 1.0 if the guess is whole tokens of the continuation.

    With y the guess's UTF-8 bytes and x the continuation's, the reward is 1.0
    when ``y == x[:len(y)]`` and ``len(y)`` is in ``boundaries`` (the cumulative
    byte lengths of the continuation's tokens), else 0.0. None, an empty guess
    (0 is never a boundary) and text that cannot be encoded (lone surrogates)
    score 0.0.

    >>> prefix_reward(" para", " paragraph", [5, 10])
    1.0
    >>> prefix_reward(" paragraph", " paragraph", [5, 10])
    1.0
    >>> prefix_reward(" par", " paragraph", [5, 10])
    0.0
    >>> prefix_reward(None, " paragraph", [5, 10])
    0.0
    """
    if prediction is None:
        return 0.0
    y = _utf8(prediction)
    x = _utf8(continuation)
    if not y or x is None:
        return 0.0
    return 1.0 if len(y) in boundaries and x.startswith(y) else 0.0


def first_token_reward(prediction: str | None, continuation: str, boundaries: Sequence[int]) -> float:
    """First-token matching (paper App. A): 1.0 iff the guess is exactly the first token.

    >>> first_token_reward(" para", " paragraph", [5, 10])
    1.0
    >>> first_token_reward(" paragraph", " paragraph", [5, 10])
    0.0
    """
    if prediction is None or len(boundaries) == 0:
        return 0.0
    y = _utf8(prediction)
    x = _utf8(continuation)
    if not y or x is None:
        return 0.0
    return 1.0 if y == x[: boundaries[0]] else 0.0


RewardFn = Callable[[str | None, str, Sequence[int]], float]

REWARDS: dict[str, RewardFn] = {
    "prefix": prefix_reward,
    "first-token": first_token_reward,
}


def get_reward_fn(name: str) -> RewardFn:
    """Look up a reward by name; an unknown name raises ValueError naming the choices.

    >>> get_reward_fn("prefix") is prefix_reward
    True
    """
    try:
        return REWARDS[name]
    except (KeyError, TypeError):
        choices = ", ".join(sorted(REWARDS))
        raise ValueError(f"unknown reward {name!r}; choose one of: {choices}") from None


def score_completions(
    completions: Sequence[str],
    continuations: Sequence[str],
    boundaries_list: Sequence[Sequence[int]],
    reward: str | RewardFn = "prefix",
    extract: Callable[[str], str | None] = extract_prediction,
) -> list[float]:
    """Score a batch: ``reward(extract(completion), continuation, boundaries)`` per item.

    ``reward`` is a name from ``REWARDS`` or a reward function; ``extract`` turns a
    completion into a guess (the identity for the raw ``continuation`` prompt
    format). The three sequences must have the same length.

    >>> score_completions(["\\\\boxed{ para}", "\\\\boxed{ par}"], [" paragraph"] * 2, [[5, 10]] * 2)
    [1.0, 0.0]
    """
    if not (len(completions) == len(continuations) == len(boundaries_list)):
        raise ValueError(
            "completions, continuations and boundaries_list must have one entry per item; got "
            f"{len(completions)}, {len(continuations)} and {len(boundaries_list)}"
        )
    reward_fn = get_reward_fn(reward) if isinstance(reward, str) else reward
    return [
        reward_fn(extract(completion), continuation, boundaries)
        for completion, continuation, boundaries in zip(completions, continuations, boundaries_list)
    ]
