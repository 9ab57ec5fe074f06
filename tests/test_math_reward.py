"""The math reward (`--reward math`): math-verify's verdict on a completion's final answer, under a
deadline, and the answer readers of `rpt answer-tasks` (rptdata/math_answers.py)."""

from __future__ import annotations

import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from math_verify import parse, verify

from rptdata.math_answers import answer_from, check_answer, last_boxed, parse_reference
from rpttrain.integrations.trl import rpt_reward
from rpttrain.integrations.verl import compute_score
from rpttrain.reward import get_reward_fn, math_reward, score_completions

# a boxed sum sympy tries to evaluate in C code, where no signal reaches it: only killing the worker stops it
HANGS = "\\boxed{\\sum_{k=1}^{10^{12}} k^{k}}"


def reference_verdict(box: str, answer: str) -> float:
    """math-verify called directly, as its README shows: verify(parse(gold), parse(answer))."""
    return float(verify(parse(f"${answer}$"), parse(f"\\boxed{{{box}}}")))


@pytest.mark.parametrize(
    ("completion", "answer", "expected"),
    [
        ("so the answer is \\boxed{72}.", "72", 1.0),
        ("\\boxed{72.0}", "72", 1.0),
        ("\\boxed{\\frac{144}{2}}", "72", 1.0),
        ("\\boxed{$72$}", "72", 1.0),
        ("<think>it is \\boxed{70}</think> so \\boxed{72}", "72", 1.0),
        ("<think>it is \\boxed{72}</think> so \\boxed{70}", "72", 0.0),
        ("The final answer is 72", "72", 1.0),  # an anchored answer without a box
        ("\\boxed{0.5}", "\\frac{1}{2}", 1.0),
        ("\\boxed{\\sqrt{2}}", "\\sqrt{2}", 1.0),
        ("\\boxed{73}", "72", 0.0),
        ("\\boxed{}", "72", 0.0),
        ("\\boxed{ }", "72", 0.0),
        ("\\boxed{\\frac{1}{", "72", 0.0),  # malformed LaTeX: a box that never closes
        ("\\boxed{\\frac{}{}}", "72", 0.0),
        ("... so there are 20 kids in 20", "20", 0.0),  # a truncated number is no answer
        ("", "72", 0.0),
    ],
)
def test_math_reward_cases(completion, answer, expected):
    assert math_reward(completion, answer) == expected
    assert get_reward_fn("math")(completion, answer, []) == expected


@pytest.mark.parametrize("form", ["72", "72.0", "\\frac{144}{2}", "$72$", "73", "", "\\frac{1}{", "x", "7 2"])
def test_math_reward_matches_math_verify_on_boxed_forms(form):
    assert math_reward(f"reasoning ... \\boxed{{{form}}}", "72") == reference_verdict(form, "72")


_numbers = st.integers(-10_000, 10_000)


@settings(max_examples=60, deadline=None)
@given(_numbers, _numbers, st.sampled_from(["{a}", "{a}.0", "\\frac{{{b}}}{{1}}", "$ {a} $", "\\frac{{{c}}}{{2}}"]))
def test_math_reward_matches_math_verify_property(a, b, form):
    """Equivalent and wrong forms of integers: the reward equals math-verify's own verdict, and an
    equivalent form of the right number always scores 1."""
    text = form.format(a=a, b=b, c=2 * b)
    got = math_reward(f"so \\boxed{{{text}}}", str(b))
    assert got == reference_verdict(text, str(b))
    if "{b}" in form or "{c}" in form:
        assert got == 1.0


@settings(max_examples=80, deadline=None)
@given(st.text(max_size=60), st.text(alphabet="0123456789", min_size=1, max_size=4))
def test_math_reward_never_raises(completion, answer):
    assert math_reward(completion, answer) in (0.0, 1.0)


def test_a_hanging_check_times_out_and_is_counted():
    started = time.monotonic()
    v = check_answer(HANGS, "72", timeout_s=0.5)
    assert (v.reward, v.status) == (0.0, "timeout")
    assert time.monotonic() - started < 10
    assert check_answer("\\boxed{72}", "72").status == "ok"  # a fresh worker takes over


def test_checks_from_another_thread():
    out = []
    t = threading.Thread(target=lambda: out.extend([check_answer("\\boxed{72}", "72"), check_answer(HANGS, "7", 0.5)]))
    t.start()
    t.join(60)
    assert [v.status for v in out] == ["ok", "timeout"]
    assert out[0].reward == 1.0 and out[0].extracted == "72"


def test_statuses():
    assert check_answer("\\boxed{}", "72").status == "no_answer"
    assert check_answer("nothing here", "72").status == "no_answer"
    assert check_answer("\\boxed{70}", "72").status == "ok"
    with pytest.raises(ValueError, match="timeout"):
        check_answer("\\boxed{72}", "72", timeout_s=0)


def test_the_integrations_call_the_same_reward():
    completions = ["so \\boxed{\\frac{144}{2}}", "\\boxed{70}"]
    assert score_completions(completions, ["72", "72"], [[], []], reward="math") == [1.0, 0.0]
    assert rpt_reward(["p", "p"], completions, continuation=["72", "72"], boundaries=[[], []], reward="math") == [
        1.0,
        0.0,
    ]
    gt = {"answer": "72", "reward": "math", "format": "answer"}
    assert [compute_score("rpt", c, gt) for c in completions] == [1.0, 0.0]


@pytest.mark.parametrize(
    ("value", "rule", "expected"),
    [
        ("Natalia sold 48/2 = 24.\n#### 72", "gsm8k", "72"),
        ("#### 1,234", "gsm8k", "1234"),
        ("#### -5", "gsm8k", "-5"),
        ("no mark here", "gsm8k", None),
        ("The answer is \\(\\boxed{115440}\\).", "boxed", "115440"),
        ("\\boxed{\\frac{a}{b}} and \\boxed{x^{2}}", "boxed", "x^{2}"),
        ("\\boxed{}", "boxed", None),
        ("  \\frac{1}{2} ", "plain", "\\frac{1}{2}"),
        ("", "plain", None),
    ],
)
def test_answer_from(value, rule, expected):
    assert answer_from(value, rule) == expected


def test_parse_reference():
    assert parse_reference("72") == ["72"]
    assert parse_reference("\\frac{1}{2}") == ["\\frac{1}{2}"]
    assert parse_reference("") == []


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="ab{}\\oxed ", max_size=40))
def test_last_boxed_is_a_box_of_the_text(text):
    got = last_boxed(text)
    if got is not None:
        assert f"\\boxed{{{got}}}" in text
