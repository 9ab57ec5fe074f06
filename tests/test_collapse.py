"""Tests for rpttrain/collapse.py: the collapse monitor's three figures per group.

Run: .venv/bin/python -m pytest -q tests/test_collapse.py
"""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rpttrain.collapse import COLLAPSE_KEYS, collapse_metrics, group_collapse


def test_hand_computed_groups():
    # G = 8: six say " the" (wrong), two say " a" (right) -> collapsed on a wrong answer
    g = group_collapse([" the"] * 6 + [" a"] * 2, [False] * 6 + [True] * 2)
    assert (g.distinct, g.majority_share, g.wrong_consensus) == (2, 0.75, True)
    # exactly G/2 wrong agreeing counts; fewer does not
    assert group_collapse([" x"] * 4 + [" a", " b", " c", " d"], [False] * 8).wrong_consensus
    assert not group_collapse([" x"] * 3 + [" a", " b", " c", " d", " e"], [False] * 8).wrong_consensus
    # a right majority is not wrong consensus
    assert not group_collapse([" a"] * 8, [True] * 8).wrong_consensus
    # a tie between a right and a wrong prediction goes to the right one
    assert not group_collapse([" a", " a", " b", " b"], [True, True, False, False]).wrong_consensus
    # missing predictions are one value, never wrong consensus
    g = group_collapse([None] * 5 + [" a", " b", " b"], [False] * 8)
    assert (g.distinct, g.majority_share, g.wrong_consensus) == (3, 5 / 8, False)


def test_predictions_compare_as_nfc_bytes():
    # "é" precomposed and decomposed are one prediction; a leading space makes another
    g = group_collapse(["\u00e9", "e\u0301", " \u00e9"], [False] * 3)
    assert g.distinct == 2 and g.majority_share == 2 / 3


def test_metrics_means_and_empty():
    m = collapse_metrics([([" a"] * 4, [False] * 4), ([" a", " b", " c", " d"], [True, False, False, False])])
    assert m == {"distinct_predictions_mean": 2.5, "majority_share_mean": 0.625, "wrong_consensus_share": 0.5}
    assert collapse_metrics([]) == dict.fromkeys(COLLAPSE_KEYS)
    with pytest.raises(ValueError, match="one correct flag per prediction"):
        group_collapse([" a"], [])


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.one_of(st.none(), st.sampled_from([" a", " b", " c", "é"])), st.booleans()),
        min_size=1,
        max_size=16,
    )
)
def test_properties(group):
    preds = [p for p, _ in group]
    # a prediction's correctness is a property of the prediction: make the flags consistent
    right = {p for p, ok in group if ok and p is not None}
    correct = [p in right for p in preds]
    g = group_collapse(preds, correct)
    n = len(preds)
    assert 1 <= g.distinct <= n
    assert 1 / n <= g.majority_share <= 1
    assert g.distinct * g.majority_share >= 1 - 1e-12  # the most common holds at least its share
    if g.distinct == 1:
        assert g.majority_share == 1
    if g.wrong_consensus:
        assert g.majority_share >= 0.5
        assert not all(correct)
    if all(correct):
        assert not g.wrong_consensus
