"""Tests for rpttrain/reward.py: extraction, prefix and first-token rewards, hostile inputs.

Run: .venv/bin/python -m pytest -q tests/test_reward.py
"""

import itertools
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rpttrain.reward import (
    REWARDS,
    conditional_dense_rewards,
    dense_reward,
    exact_reward,
    extract_prediction,
    first_token_reward,
    get_reward_fn,
    prefix_reward,
    score_completions,
    score_group,
)

SURROGATE = chr(0xD800)


def cumulative_byte_ends(tokens):
    return list(itertools.accumulate(len(t.encode("utf-8")) for t in tokens))


def reference_extract(text):
    """Char-by-char stack scan, quadratic-safe only for small inputs: the spec in code."""
    end = text.rfind("</think>")
    i = 0 if end < 0 else end + len("</think>")
    stack, best = [], None
    while i < len(text):
        if text.startswith("\\boxed{", i):
            stack.append(i + len("\\boxed{"))
            i += len("\\boxed{")
            continue
        if text[i] == "{":
            stack.append(-1)
        elif text[i] == "}" and stack:
            top = stack.pop()
            if top >= 0:
                best = (top, i)
        i += 1
    return None if best is None else text[best[0] : best[1]]


# ---------------------------------------------------------------- prefix reward


@pytest.mark.parametrize(
    "prediction, expected",
    [
        (" para", 1.0),
        (" paragraph", 1.0),
        (" par", 0.0),
        (" paragr", 0.0),
        ("", 0.0),
        (None, 0.0),
        ("para", 0.0),
        (" paragraphs", 0.0),
        (" Para", 0.0),
    ],
)
def test_prefix_reward_paper_example(prediction, expected):
    assert prefix_reward(prediction, " paragraph", [5, 10]) == expected


def test_first_token_reward_paper_example():
    assert first_token_reward(" para", " paragraph", [5, 10]) == 1.0
    assert first_token_reward(" paragraph", " paragraph", [5, 10]) == 0.0
    assert first_token_reward(" par", " paragraph", [5, 10]) == 0.0
    assert first_token_reward("", " paragraph", [5, 10]) == 0.0
    assert first_token_reward(None, " paragraph", [5, 10]) == 0.0
    assert first_token_reward(" para", " paragraph", []) == 0.0


def test_multibyte_continuations():
    # "é" is 2 UTF-8 bytes: one token, or two byte-level tokens of 1 byte each.
    assert prefix_reward("é", "é", [2]) == 1.0
    assert prefix_reward("é", "é", [1, 2]) == 1.0
    assert first_token_reward("é", "é", [1, 2]) == 0.0  # the first token is half a character
    # Tokens: b"\xc3" and b"\xa9a": no string stops after the first byte.
    assert prefix_reward("é", "éa", [1, 3]) == 0.0
    assert prefix_reward("éa", "éa", [1, 3]) == 1.0
    assert prefix_reward("日本", "日本語", [3, 6, 9]) == 1.0
    assert prefix_reward("日本", "日本語", [3, 9]) == 0.0


def test_lone_surrogates_score_zero():
    assert prefix_reward(SURROGATE, " x", [2]) == 0.0
    assert prefix_reward(" x" + SURROGATE, " x" + SURROGATE, [2, 5]) == 0.0
    assert prefix_reward(" x", " x" + SURROGATE, [2]) == 0.0
    assert first_token_reward(SURROGATE, "a", [1]) == 0.0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(min_size=1, max_size=6), min_size=1, max_size=8))
def test_prefix_reward_is_one_exactly_on_token_boundaries(tokens):
    continuation = "".join(tokens)
    boundaries = cumulative_byte_ends(tokens)
    x = continuation.encode("utf-8")
    for k in range(1, len(x) + 1):
        try:
            prediction = x[:k].decode("utf-8")
        except UnicodeDecodeError:
            continue  # no string has these bytes
        expected = 1.0 if k in boundaries else 0.0
        assert prefix_reward(prediction, continuation, boundaries) == expected
        assert first_token_reward(prediction, continuation, boundaries) == float(k == boundaries[0])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(min_size=1, max_size=6), min_size=1, max_size=8), st.text(min_size=1, max_size=8))
def test_prefix_reward_rejects_non_prefixes(tokens, prediction):
    continuation = "".join(tokens)
    if not continuation.encode("utf-8").startswith(prediction.encode("utf-8")):
        assert prefix_reward(prediction, continuation, cumulative_byte_ends(tokens)) == 0.0


_any_text = st.text(alphabet=st.characters(codec=None) | st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF))


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.none(), _any_text), _any_text, st.lists(st.integers(1, 40), max_size=6))
def test_rewards_never_raise(prediction, continuation, boundaries):
    boundaries = sorted(set(boundaries))
    for fn in REWARDS.values():
        assert fn(prediction, continuation, boundaries) in (0.0, 1.0)


def test_reward_registry():
    assert get_reward_fn("prefix") is prefix_reward
    assert get_reward_fn("first-token") is first_token_reward
    assert get_reward_fn("exact") is exact_reward
    with pytest.raises(
        ValueError, match="prefix, first-token, exact, exact-nocase, math, dense, conditional-dense, judge"
    ):
        get_reward_fn("oracle")
    with pytest.raises(ValueError, match="asks a judge model"):
        get_reward_fn("judge")
    with pytest.raises(ValueError, match="P\\(y\\[0\\] \\| x<t; theta\\)"):
        get_reward_fn("dense")


def test_score_completions():
    completions = ["</think>\\boxed{ para}", "\\boxed{ paragraph}", "\\boxed{ par}", "nothing"]
    scores = score_completions(completions, [" paragraph"] * 4, [[5, 10]] * 4)
    assert scores == [1.0, 1.0, 0.0, 0.0]
    assert score_completions(completions, [" paragraph"] * 4, [[5, 10]] * 4, reward="first-token") == [
        1.0,
        0.0,
        0.0,
        0.0,
    ]
    assert score_completions([" para"], [" paragraph"], [[5, 10]], extract=lambda c: c) == [1.0]
    assert score_completions([" para"], [" paragraph"], [[5, 10]], reward=lambda p, c, b: 0.5) == [0.5]
    with pytest.raises(ValueError, match="one entry per item"):
        score_completions(["a"], [], [])


# ---------------------------------------------------------------- extraction


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("\\boxed{ para}", " para"),
        ("\\boxed{a{b}c}", "a{b}c"),
        ("\\boxed{\\frac{a}{b}}", "\\frac{a}{b}"),
        ("\\boxed{\\text{x}}", "\\text{x}"),
        ("\\boxed{}", ""),
        ("no box here", None),
        ("", None),
        ("\\boxed{1} then \\boxed{2}", "2"),
        ("<think>\\boxed{1}</think>\\boxed{2}", "2"),
        ("<think>\\boxed{1}</think> answer: 3", None),  # the box in the thinking does not count
        ("\\boxed{1}</think>\\boxed{2}</think>\\boxed{3}", "3"),
        ("<think>no end of thinking \\boxed{4}", "4"),
        ("\\boxed{a \\boxed{b}}", "a \\boxed{b}"),  # nested: the outermost closes last
        ("\\boxed{a \\boxed{b}} \\boxed{c}", "c"),
        ("\\boxed{1} and \\boxed{2", "1"),  # unclosed final box: fall back
        ("\\boxed{1} and \\boxed{2 \\boxed{3}", "3"),  # fall back to the complete box inside it
        ("\\boxed{a{b}", None),  # unbalanced
        ("}}} \\boxed{x} }}}", "x"),
        ("{{{ \\boxed{x}", "x"),
        ("{ \\boxed{x} }", "x"),
        ("\\boxed{x}}}}", "x"),
        ("\\boxed{{}}", "{}"),
        ("\\boxed{{a}{b}} c", "{a}{b}"),
        ("\\boxed{}}\\boxed{", ""),
        ("\\boxed {x}", None),
        ("\\\\boxed{x}", "x"),
        ("\\boxed{" + SURROGATE + "}", SURROGATE),
        ("\\boxed{\n multi\nline }", "\n multi\nline "),
    ],
)
def test_extract_prediction_examples(completion, expected):
    assert extract_prediction(completion) == expected
    assert reference_extract(completion) == expected


_pieces = st.sampled_from(["\\boxed{", "{", "}", "</think>", "\\text{", "a", " ", "x y", "\\", "boxed", "é", SURROGATE])


@settings(max_examples=1000, deadline=None)
@given(st.lists(_pieces, max_size=40).map("".join))
def test_extract_prediction_fuzz_matches_reference(text):
    result = extract_prediction(text)
    assert result == reference_extract(text)
    assert result is None or result in text


@settings(max_examples=300, deadline=None)
@given(_any_text)
def test_extract_prediction_never_raises(text):
    result = extract_prediction(text)
    assert result is None or result in text


# ---------------------------------------------------------------- linear time

HOSTILE = {
    "unclosed boxes": lambda n: "\\boxed{" * (n // 7),
    "open braces then a box": lambda n: "{" * n + "\\boxed{x}",
    "close braces then a box": lambda n: "}" * n + "\\boxed{x}",
    "box of open braces": lambda n: "\\boxed{" + "{" * n,
    "box of alternating braces": lambda n: "\\boxed{" + "}{" * (n // 2),
    "box of brace pairs with text": lambda n: "\\boxed{" + "{a}b" * (n // 4),
    "box of unbalanced triples": lambda n: "\\boxed{" + "{{}" * (n // 3),
    "many boxes": lambda n: "\\boxed{x}" * (n // 9),
    "many nested boxes": lambda n: "\\boxed{a{b}c}" * (n // 13),
    "deep nesting then closes": lambda n: "\\boxed{" * (n // 14) + "}" * (n // 14),
    "boxes inside unclosed braces": lambda n: "\\boxed{{" + "{\\boxed{" * (n // 8),
    "think tags": lambda n: "</think>\\boxed{" * (n // 15),
}


def _seconds(text):
    # CPU time of this process: other processes on the cores do not count, wall time would
    start = time.process_time()
    extract_prediction(text)
    return time.process_time() - start


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_extract_prediction_is_linear_on_hostile_input(name):
    make = HOSTILE[name]
    small, big = make(500_000), make(2_000_000)
    # the fastest of three runs each, in CPU time (a busy machine slows wall time, not this);
    # quadratic time would make the 4x input take ~16x longer
    t_small = min(_seconds(small) for _ in range(3))
    t_big = min(_seconds(big) for _ in range(3))
    assert t_big < 10 * t_small + 0.05, f"{name}: {t_small:.3f} s -> {t_big:.3f} s for 4x the input"


# ---------------------------------------------------------------- App. A dense rewards
# Hand-computed from the paper's definitions (arXiv 2506.08007v1, App. A): a group of G = 4
# rollouts of one context whose true next token x_t has id 11. The policy's probabilities of
# each rollout's first token, P(y[0] | x<t; theta), are given.


def test_dense_reward_hand_computed_group():
    first_ids, probs = [11, 42, 42, None], [0.5, 0.125, 0.125, None]
    # correct -> 1; wrong -> the LM probability of that wrong first token; no prediction -> 0
    assert [dense_reward(i, 11, p) for i, p in zip(first_ids, probs)] == [1.0, 0.125, 0.125, 0.0]
    # at least one rollout is right: conditional dense equals dense
    assert conditional_dense_rewards(first_ids, 11, probs) == [1.0, 0.125, 0.125, 0.0]
    # all G wrong: the fallback scheme for all (zero reward, the paper's first example) ...
    assert conditional_dense_rewards([42, 7, 7, None], 11, [0.125, 0.25, 0.25, None]) == [0.0] * 4
    # ... or a uniform small penalty (its second)
    assert conditional_dense_rewards([42, 7], 11, [0.125, 0.25], fallback=-0.1) == [-0.1, -0.1]
    # where dense still gives the all-wrong group a signal, conditional dense gives none
    assert [dense_reward(i, 11, p) for i, p in [(42, 0.125), (7, 0.25)]] == [0.125, 0.25]


def test_score_group_all_four_rewards():
    preds, cont, bounds = [" para", " paragraph", " x", None], " paragraph", [5, 10]
    assert score_group("prefix", preds, cont, bounds) == ([1.0, 1.0, 0.0, 0.0], [True, True, False, False])
    assert score_group("first-token", preds, cont, bounds) == ([1.0, 0.0, 0.0, 0.0], [True, False, False, False])
    # dense rewards judge y[0], the prediction's first TOKEN (" paragraph" may be one token, not " para")
    ids, probs = [11, 12, 13, None], [0.5, 0.25, 0.125, None]
    assert score_group("dense", preds, cont, bounds, ids, 11, probs) == (
        [1.0, 0.25, 0.125, 0.0],
        [True, False, False, False],
    )
    assert score_group("conditional-dense", preds, cont, bounds, ids, 99, probs) == ([0.0] * 4, [False] * 4)
    with pytest.raises(ValueError, match="needs first_ids"):
        score_group("dense", preds, cont, bounds)
    with pytest.raises(ValueError, match="probability in \\[0, 1\\]"):
        dense_reward(3, 4, 1.5)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.one_of(st.none(), st.integers(0, 5)), st.floats(0, 1)), min_size=1, max_size=8),
    st.integers(0, 5),
)
def test_dense_rewards_properties(group, target):
    ids = [i for i, _ in group]
    probs = [p for _, p in group]
    dense = [dense_reward(i, target, p) for i, p in group]
    for i, p, r in zip(ids, probs, dense):
        assert 0.0 <= r <= 1.0
        if i is None:
            assert r == 0.0
        elif i == target:
            assert r == 1.0
        else:
            assert r == p  # the wrong token's own probability, never more than a right answer
    cond = conditional_dense_rewards(ids, target, probs)
    if target in ids:
        assert cond == dense
    else:
        assert cond == [0.0] * len(ids)  # no right rollout: no signal, whatever the probabilities
