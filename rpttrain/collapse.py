"""The collapse monitor: how much a group of G rollouts of one context agrees, and on what.

    group_collapse([" a", " a", " b", None], [False, False, True, False])   # -> GroupCollapse(3, 0.5, True)
    collapse_metrics(groups)   # {"distinct_predictions_mean", "majority_share_mean", "wrong_consensus_share"}

Mode collapse shows as the G samples converging on one prediction; reward hacking (or a prior
the policy cannot leave) as a group agreeing on a WRONG one. Per group:

- distinct: the number of distinct predictions, compared as normalized bytes: the UTF-8 bytes of
  the NFC form (the corpus's normalization, `rpt prepare`), so two spellings of one character
  count once. A missing prediction (no box) is one value of its own.
- majority share: the count of the most common prediction over G.
- wrong consensus: the most common prediction is wrong (not correct under the run's reward) and
  held by at least G/2 of the group. A tie for most common is resolved towards a correct
  prediction, then towards an actual one, so a flagged group is unambiguous. A majority of missing
  predictions is never wrong consensus (that is a format failure: `no_prediction_share`).

`rpt train` logs the three means per step (metrics.jsonl), `rpt plot` draws them and `rpt eval
--mode reasoning` reports them per band. Pure Python, no torch.
"""

from __future__ import annotations

import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["COLLAPSE_KEYS", "GroupCollapse", "collapse_metrics", "group_collapse", "normalized_key"]

COLLAPSE_KEYS = ("distinct_predictions_mean", "majority_share_mean", "wrong_consensus_share")


def normalized_key(prediction: str | None) -> bytes | None:
    """The bytes a prediction is compared by: UTF-8 of its NFC form (lone surrogates kept as
    surrogatepass bytes so no input raises); None stays None.

    >>> normalized_key("e\\u0301") == normalized_key("\\u00e9")
    True
    """
    if prediction is None:
        return None
    return unicodedata.normalize("NFC", prediction).encode("utf-8", "surrogatepass")


@dataclass(frozen=True)
class GroupCollapse:
    distinct: int
    majority_share: float
    wrong_consensus: bool


def group_collapse(predictions: Sequence[str | None], correct: Sequence[bool]) -> GroupCollapse:
    """The collapse figures of one group (predictions and their correct flags, same length >= 1).

    >>> group_collapse([" a", " a", " b", None], [False, False, True, False])
    GroupCollapse(distinct=3, majority_share=0.5, wrong_consensus=True)
    >>> group_collapse([" a", " a", " b", " b"], [False, False, True, True])
    GroupCollapse(distinct=2, majority_share=0.5, wrong_consensus=False)
    """
    if len(predictions) != len(correct) or not predictions:
        raise ValueError(
            f"need one correct flag per prediction and at least one; got {len(predictions)} and {len(correct)}"
        )
    keys = [normalized_key(p) for p in predictions]
    counts = Counter(keys)
    right = {k for k, c in zip(keys, correct) if c}
    # most common first; ties: correct before wrong, an actual prediction before a missing one
    top, n = max(counts.items(), key=lambda kv: (kv[1], kv[0] in right, kv[0] is not None))
    g = len(keys)
    return GroupCollapse(len(counts), n / g, top is not None and top not in right and 2 * n >= g)


def collapse_metrics(groups: Sequence[tuple[Sequence[str | None], Sequence[bool]]]) -> dict[str, float | None]:
    """Means over groups of `group_collapse`: distinct predictions, majority share, and the share
    of groups in wrong consensus. None for each when there are no groups.

    >>> collapse_metrics([([" a", " a"], [False, False]), ([" a", " b"], [True, False])])
    {'distinct_predictions_mean': 1.5, 'majority_share_mean': 0.75, 'wrong_consensus_share': 0.5}
    """
    figs = [group_collapse(p, c) for p, c in groups]
    if not figs:
        return dict.fromkeys(COLLAPSE_KEYS)
    n = len(figs)
    return {
        "distinct_predictions_mean": sum(f.distinct for f in figs) / n,
        "majority_share_mean": sum(f.majority_share for f in figs) / n,
        "wrong_consensus_share": sum(f.wrong_consensus for f in figs) / n,
    }
