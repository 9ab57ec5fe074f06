"""Answer extraction and the RPT rewards: pure string functions (math-verify for the math reward).

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
- ``dense_reward`` / ``conditional_dense_rewards``: App. A's dense and conditional
  dense rewards. They need the policy's probability of the prediction's first
  token, which the caller supplies (``rpttrain.dense`` computes it in the loop).
- ``exact_reward`` / ``exact_nocase_reward``: the sentence and span tasks' exact match
  (``rpt make-tasks --unit``, PretrainZero's check): the guess equals the target after
  ``normalize_text`` (NFC, whitespace folded and stripped; case folded only in the second).
- ``math_reward``: the answer tasks' reward (``rpt answer-tasks``): math-verify's verdict on
  the completion's final answer against the reference, under a deadline
  (``rptdata.math_answers``).
- ``score_group``: one group of G predictions under any of the four rewards, with
  the correct flags the accuracy and the collapse monitor count.
- ``score_completions``: the batch form used by training, probe, eval and the
  verl/TRL wrappers, so the training reward and the eval metric cannot drift apart.

Rewards work on UTF-8 bytes, and ``boundaries`` are the cumulative byte lengths
of the continuation's tokens (``token_end_bytes`` in the task files), so a
byte-level BPE token that ends inside a multi-byte character is a boundary no
string guess can reach; such positions can only be won by covering more tokens.

Left out on purpose:

- The probability the dense rewards need: this module takes it as a number and
  never imports torch. Which model gives it, and when, is ``rpttrain.dense``'s job.
- No whitespace stripping or normalisation of the guess: a leading space is part
  of the token (``\\boxed{ para}`` predicts " para"), and ``\\boxed{\\text{x}}``
  is compared verbatim (the prompts tell the model not to use ``\\text{}``).
- Only the literal spelling ``\\boxed{`` opens a box (not ``\\boxed {`` or
  ``\\fbox{``).

Run the examples with ``python -m doctest rpttrain/reward.py``.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Sequence

from rptdata.errors import BadOption
from rptdata.math_answers import DEFAULT_TIMEOUT_S, check_answer, last_boxed

__all__ = [
    "ANSWER_REWARDS",
    "DENSE_REWARDS",
    "JUDGE_REWARDS",
    "UNIT_REWARDS",
    "REWARDS",
    "REWARD_NAMES",
    "conditional_dense_rewards",
    "dense_reward",
    "exact_nocase_reward",
    "exact_reward",
    "extract_prediction",
    "first_token_reward",
    "get_reward_fn",
    "math_reward",
    "normalize_text",
    "prefix_reward",
    "reward_text",
    "score_completions",
    "score_group",
]

_END_THINK = "</think>"


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

    The scan is `rptdata.math_answers.last_boxed` (one forward pass with a stack: linear time
    even for megabytes of unclosed ``\\boxed{`` or stray braces). Never raises for a ``str``.

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
    return last_boxed(completion, 0 if end_think < 0 else end_think + len(_END_THINK))


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


_SPACE = re.compile(r"\s+")


def normalize_text(text: str, casefold: bool = False) -> str:
    """The form the exact rewards compare: Unicode NFC, every run of whitespace (spaces, tabs,
    newlines) one space, none at the ends; with `casefold`, ``str.casefold`` too.

    >>> normalize_text("  cafe\\u0301\\n\\tau  lait ")
    'café au lait'
    >>> normalize_text("Straße", casefold=True)
    'strasse'
    """
    text = _SPACE.sub(" ", unicodedata.normalize("NFC", text)).strip()
    return text.casefold() if casefold else text


def exact_reward(prediction: str | None, target: str, boundaries: Sequence[int] = ()) -> float:
    """Exact match (sentence and span tasks): 1.0 when the guess equals the target after
    ``normalize_text`` (NFC, whitespace folded, ends stripped; case kept), else 0.0. None and a
    guess that normalizes to nothing score 0.0; `boundaries` is unused.

    >>> exact_reward(" the cat\\n", "the  cat"), exact_reward("The cat", "the cat"), exact_reward("", " ")
    (1.0, 0.0, 0.0)
    """
    if prediction is None:
        return 0.0
    y = normalize_text(prediction)
    return 1.0 if y and y == normalize_text(target) else 0.0


def exact_nocase_reward(prediction: str | None, target: str, boundaries: Sequence[int] = ()) -> float:
    """``exact_reward`` with case folded on both sides.

    >>> exact_nocase_reward("The Cat", "the cat"), exact_nocase_reward("the dog", "the cat")
    (1.0, 0.0)
    """
    if prediction is None:
        return 0.0
    y = normalize_text(prediction, casefold=True)
    return 1.0 if y and y == normalize_text(target, casefold=True) else 0.0


def math_reward(prediction: str | None, answer: str, boundaries: Sequence[int] = ()) -> float:
    """The answer tasks' reward (`rpt answer-tasks`): 1.0 when math-verify finds the completion's
    final answer equal to the reference `answer`, else 0.0 (no answer, a wrong one, a check that
    timed out or failed). `prediction` is the completion's whole text (`reward_text`): the check
    reads the last ``\\boxed{}`` after ``</think>``, else an anchored answer
    (`rptdata.math_answers.check_answer`, which gives the status too); `boundaries` is unused
    (answer tasks have none). Each check runs under a deadline of `DEFAULT_TIMEOUT_S`.

    >>> math_reward("so \\\\boxed{\\\\frac{144}{2}}", "72"), math_reward("\\\\boxed{73}", "72"), math_reward(None, "72")
    (1.0, 0.0, 0.0)
    """
    if prediction is None:
        return 0.0
    return check_answer(prediction, answer, DEFAULT_TIMEOUT_S).reward


RewardFn = Callable[[str | None, str, Sequence[int]], float]

REWARDS: dict[str, RewardFn] = {
    "prefix": prefix_reward,
    "first-token": first_token_reward,
    "exact": exact_reward,
    "exact-nocase": exact_nocase_reward,
    "math": math_reward,
}
# the rewards that fit each unit of `rpt make-tasks --unit` (rpttrain.data.check_task_fit refuses
# the others by name): a prefix of a masked target is no answer, and the first-token and dense
# rewards judge one token
UNIT_REWARDS: dict[str, tuple[str, ...]] = {
    "token": ("prefix", "first-token", "dense", "conditional-dense"),
    "sentence": ("prefix", "exact", "exact-nocase", "judge"),
    "masked-sentence": ("exact", "exact-nocase", "judge"),
    "span": ("exact", "exact-nocase", "judge"),
}
# the rewards of answer tasks (`rpt answer-tasks`); every other reward is for next-token tasks
ANSWER_REWARDS = ("math",)


# App. A's rewards that need a model's probability (``dense_reward``), so no string function
DENSE_REWARDS = ("dense", "conditional-dense")
# the reward a judge model gives (`rpttrain.judge`, --judge MODEL): no string function either
JUDGE_REWARDS = ("judge",)
REWARD_NAMES = tuple(REWARDS) + DENSE_REWARDS + JUDGE_REWARDS


def reward_text(reward: str, extract: Callable[[str], str | None], completion: str) -> str | None:
    """What a reward reads of a completion: the prompt format's extraction (the boxed guess, or the
    raw text), except for the answer rewards, which read the whole completion themselves.

    >>> reward_text("prefix", extract_prediction, "\\\\boxed{ x}"), reward_text("math", extract_prediction, "\\\\boxed{7}")
    (' x', '\\\\boxed{7}')
    """
    return completion if reward in ANSWER_REWARDS else extract(completion)


def get_reward_fn(name: str) -> RewardFn:
    """Look up a string reward by name; an unknown name raises ValueError naming the choices,
    and a dense reward one saying it needs the policy's probability.

    >>> get_reward_fn("prefix") is prefix_reward
    True
    """
    if name in DENSE_REWARDS:
        raise BadOption(
            f"reward {name!r} needs the policy's probability of the prediction's first token, "
            "P(y[0] | x<t; theta), so it is no string function: score groups with rpttrain.dense.GroupScorer"
        )
    if name in JUDGE_REWARDS:
        raise BadOption(
            f"reward {name!r} asks a judge model (--judge MODEL), so it is no string function: score groups with "
            "rpttrain.dense.GroupScorer(..., judge=rpttrain.judge.Judge.load(MODEL))"
        )
    try:
        return REWARDS[name]
    except (KeyError, TypeError):
        choices = ", ".join(REWARD_NAMES)
        raise BadOption(f"unknown reward {name!r}; choose one of: {choices}") from None


def dense_reward(first_id: int | None, target_id: int, first_prob: float | None) -> float:
    """App. A's dense reward for one prediction: 1.0 when its first token is the true next token,
    else the language model's probability of that (wrong) first token.

    The paper (arXiv 2506.08007v1, App. A "Design Choices of Reward"): "correctly predicted next
    tokens (i.e., y_t^i[0] = x_t) receive a full reward (e.g., 1). For incorrect predictions
    (y_t^i[0] != x_t), the reward is a positive, smaller value, specifically the language model
    probability of generating that particular incorrect token, P(y_t^i[0] | x_<t; theta)."

    ``first_id`` is y[0], the prediction's first token id (None: no prediction, or an empty one,
    scores 0.0); ``target_id`` is x_t; ``first_prob`` is P(y[0] | x<t; theta), needed only when
    the token is wrong, and must lie in [0, 1].

    >>> dense_reward(7, 7, None)
    1.0
    >>> dense_reward(3, 7, 0.25)
    0.25
    >>> dense_reward(None, 7, None)
    0.0
    """
    if first_id is None:
        return 0.0
    if first_id == target_id:
        return 1.0
    if first_prob is None or not 0.0 <= first_prob <= 1.0:
        raise ValueError(f"a wrong first token needs its probability in [0, 1], got {first_prob!r}")
    return float(first_prob)


def conditional_dense_rewards(
    first_ids: Sequence[int | None], target_id: int, first_probs: Sequence[float | None], fallback: float = 0.0
) -> list[float]:
    """App. A's conditional dense reward for one group of G rollouts of the same context.

    The paper: "The dense reward (1 for correct, P(y_t^i | x_<t; theta) for incorrect) is used as
    described above, but only for training instances (groups of rollouts for a given prefix x_<t)
    where at least one of the G sampled rollouts correctly predicted the next token. If all G
    rollouts in a group are incorrect, a different reward scheme (e.g., zero reward for all, or a
    uniform small penalty) will be applied." Here that scheme is ``fallback`` for all (0.0: the
    paper's first example); either choice gives the group no GRPO signal.

    >>> conditional_dense_rewards([7, 3, None], 7, [0.5, 0.25, None])
    [1.0, 0.25, 0.0]
    >>> conditional_dense_rewards([3, 4], 7, [0.25, 0.5])
    [0.0, 0.0]
    """
    if len(first_ids) != len(first_probs):
        raise ValueError(f"{len(first_ids)} first tokens but {len(first_probs)} probabilities")
    if not any(i is not None and i == target_id for i in first_ids):
        return [float(fallback)] * len(first_ids)
    return [dense_reward(i, target_id, p) for i, p in zip(first_ids, first_probs)]


def score_group(
    reward: str,
    predictions: Sequence[str | None],
    continuation: str,
    boundaries: Sequence[int],
    first_ids: Sequence[int | None] | None = None,
    target_id: int | None = None,
    first_probs: Sequence[float | None] | None = None,
) -> tuple[list[float], list[bool]]:
    """Rewards and correct flags of one group of predictions of the same context.

    String rewards (prefix, first-token, exact, math): correct means a reward of 1.0. Dense rewards: correct
    means y[0] = x_t, and ``first_ids``, ``target_id`` and ``first_probs`` are required.

    >>> score_group("prefix", [" para", " par"], " paragraph", [5, 10])
    ([1.0, 0.0], [True, False])
    >>> score_group("dense", [" para", " x"], " paragraph", [5, 10], [11, 12], 11, [0.5, 0.125])
    ([1.0, 0.125], [True, False])
    """
    if reward not in DENSE_REWARDS:
        fn = get_reward_fn(reward)
        rewards = [fn(p, continuation, boundaries) for p in predictions]
        return rewards, [r == 1.0 for r in rewards]
    if first_ids is None or first_probs is None or target_id is None:
        raise ValueError(f"reward {reward!r} needs first_ids, target_id and first_probs")
    if len(first_ids) != len(predictions):
        raise ValueError(f"{len(predictions)} predictions but {len(first_ids)} first tokens")
    correct = [i is not None and i == target_id for i in first_ids]
    if reward == "dense":
        return [dense_reward(i, target_id, p) for i, p in zip(first_ids, first_probs)], correct
    return conditional_dense_rewards(first_ids, target_id, first_probs), correct


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
    if isinstance(reward, str):
        reward_fn = get_reward_fn(reward)
        read = lambda completion: reward_text(reward, extract, completion)  # noqa: E731
    else:
        reward_fn, read = reward, extract
    return [
        reward_fn(read(completion), continuation, boundaries)
        for completion, continuation, boundaries in zip(completions, continuations, boundaries_list)
    ]
