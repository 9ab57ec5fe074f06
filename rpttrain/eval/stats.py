"""The statistics of `rpt eval`: pure functions of per-task scores, no model, no files.

wilson_interval(81, 263)           -> 95% interval of an accuracy over tasks
pass_at_k(n=8, c=1, k=8)           -> unbiased Pass@k of one task from n samples
paired_difference(a, b)            -> A minus B on the same tasks, interval and p-value
band_table(entropies, scores)      -> accuracy per nested entropy band (the paper's Table 1 cells)
majority_correct(answers, rewards) -> maj@K of one task: is its most frequent final answer right
answer_scores(per_task)            -> pass@1, pass@K, maj@K with intervals, no-box share, mean length
disjoint_counts(entropies)         -> tasks per disjoint band
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from rptdata.bands import DEFAULT_BANDS, as_bands, band_of

__all__ = [
    "answer_scores",
    "band_table",
    "disjoint_counts",
    "majority_correct",
    "paired_difference",
    "pass_at_k",
    "wilson_interval",
]


def wilson_interval(k: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials (95% for z = 1.96).

    k may be fractional (a mean reward summed over tasks). n = 0 gives (0.0, 1.0).

    >>> [round(x, 4) for x in wilson_interval(5, 10)]
    [0.2366, 0.7634]
    >>> [round(x, 4) for x in wilson_interval(0, 10)]
    [0.0, 0.2775]
    >>> [round(x, 4) for x in wilson_interval(10, 10)]
    [0.7225, 1.0]
    """
    if n <= 0:
        return 0.0, 1.0
    if not 0 <= k <= n:
        raise ValueError(f"successes must be between 0 and n={n}, not {k}")
    p = k / n
    denom = 1.0 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased Pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k)
    (Chen et al. 2021), computed as a stable product.

    >>> pass_at_k(8, 0, 8), pass_at_k(8, 1, 8), pass_at_k(8, 1, 1)
    (0.0, 1.0, 0.125)
    >>> round(pass_at_k(4, 2, 2), 4)   # 1 - C(2,2)/C(4,2) = 1 - 1/6
    0.8333
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n (got n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def paired_difference(a: Sequence[float], b: Sequence[float], z: float = 1.96) -> dict:
    """Accuracy of A minus accuracy of B on the same tasks, with a 95% interval and a p-value.

    Pairing matters: two models scored on the same 300 tasks differ far less than two independent
    Wilson intervals suggest. The interval is the normal one on the per-task differences; the
    p-value is the exact McNemar test (a sign test on the tasks only one model got right) when every
    score is 0 or 1, else a paired z test.

    >>> d = paired_difference([1, 1, 1, 0, 1, 0], [1, 0, 0, 0, 1, 0])
    >>> round(d["diff"], 4), d["wins"], d["losses"], d["p_value"]
    (0.3333, 2, 0, 0.5)
    >>> round(d["ci_low"], 4), round(d["ci_high"], 4)   # 1/3 -+ 1.96 * sd(differences) / sqrt(6)
    (-0.0799, 0.7465)
    >>> d = paired_difference([0.5, 0.75, 0.25, 1.0], [0.25, 0.5, 0.25, 0.5])   # means of K samples: a z test
    >>> round(d["diff"], 4), round(d["p_value"], 4)
    (0.25, 0.0143)
    """
    from scipy.stats import binomtest

    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"paired scores need the same tasks ({x.shape} vs {y.shape})")
    n = len(x)
    d = x - y
    out = {
        "n": n,
        "diff": float(d.mean()) if n else 0.0,
        "ci_low": None,
        "ci_high": None,
        "wins": int((d > 0).sum()),
        "losses": int((d < 0).sum()),
        "p_value": 1.0,
    }
    if n > 1:
        half = z * float(d.std(ddof=1)) / math.sqrt(n)
        out["ci_low"], out["ci_high"] = out["diff"] - half, out["diff"] + half
    if np.isin(np.concatenate([x, y]), (0.0, 1.0)).all():
        discordant = out["wins"] + out["losses"]
        if discordant:
            out["p_value"] = float(binomtest(out["wins"], discordant, 0.5).pvalue)
    elif n > 1 and half > 0:
        out["p_value"] = float(math.erfc(abs(out["diff"]) / (half / z) / math.sqrt(2)))
    elif out["diff"] != 0:
        out["p_value"] = 0.0
    return out


def band_table(
    entropies: Sequence[float], scores: Sequence[float], bands=DEFAULT_BANDS, z: float = 1.96
) -> dict[str, dict]:
    """Accuracy per nested band, plus "all": {threshold, n, correct, accuracy, ci_low, ci_high}.

    A task is in band b when its entropy exceeds b's threshold (strictly, as `band_of`), so
    bands are nested. `scores` are per-task scores in [0, 1] (a 0/1 reward, or the mean of K
    samples); `correct` is their sum. An empty band has accuracy and interval None.

    >>> t = band_table([0.2, 0.7, 1.2, 1.8], [1, 0, 1, 1])
    >>> t["easy"]["n"], t["easy"]["correct"], t["medium"]["n"], t["hard"]["accuracy"]
    (3, 2.0, 2, 1.0)
    >>> t["all"]["n"], round(t["all"]["accuracy"], 2)
    (4, 0.75)
    >>> band_table([0.1], [1.0])["hard"]["accuracy"] is None
    True
    """
    h = np.asarray(entropies, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64)
    if h.shape != s.shape:
        raise ValueError(f"one entropy per score: got {h.shape} and {s.shape}")
    out: dict[str, dict] = {}
    for name, threshold in [*as_bands(bands), ("all", None)]:
        mask = np.ones(len(h), bool) if threshold is None else h > threshold
        n = int(mask.sum())
        correct = float(s[mask].sum())
        lo, hi = wilson_interval(min(correct, n), n, z) if n else (None, None)
        out[name] = {
            "threshold": threshold,
            "n": n,
            "correct": correct,
            "accuracy": correct / n if n else None,
            "ci_low": lo,
            "ci_high": hi,
        }
    return out


def disjoint_counts(entropies: Sequence[float], bands=DEFAULT_BANDS) -> dict[str, int]:
    """Tasks per disjoint band (each counted once, in its highest band; "other" below all).

    >>> disjoint_counts([0.2, 0.7, 0.9, 1.2, 1.8])
    {'other': 1, 'easy': 2, 'medium': 1, 'hard': 1}
    """
    items = as_bands(bands)
    counts = {"other": 0, **{name: 0 for name, _ in items}}
    for e in entropies:
        counts[band_of(float(e), items)] += 1
    return counts


def majority_correct(answers: Sequence[str | None], rewards: Sequence[float]) -> bool:
    """maj@K of one task: the most frequent final answer among its K samples (samples with no
    answer do not vote; a tie goes to the answer seen first) is right when a sample giving it was
    rewarded. Answers vote by their text, stripped: "72" and "72.0" are two answers.

    >>> majority_correct(["72", "70", "72", None], [1.0, 0.0, 1.0, 0.0])
    True
    >>> majority_correct(["70", "72", "70"], [0.0, 1.0, 0.0]), majority_correct([None, None], [0.0, 0.0])
    (False, False)
    >>> majority_correct(["70", "72"], [0.0, 1.0])   # a tie: the first seen wins
    False
    """
    votes: dict[str, list] = {}
    for a, r in zip(answers, rewards):
        if a is not None and a.strip():
            votes.setdefault(a.strip(), []).append(r)
    if not votes:
        return False
    best = max(votes.values(), key=len)  # max keeps the first of equal counts: dicts keep insertion order
    return any(r >= 1.0 for r in best)


def answer_scores(per_task: Sequence[dict], z: float = 1.96) -> dict:
    """The answer-mode figures of one subject from its tasks, each {"rewards", "answers", "no_box",
    "lengths", "statuses"} (one entry per sample, K samples a task):

    - pass@1: the mean over tasks of the mean reward of the K samples, Wilson interval over tasks;
    - pass@K: the unbiased estimator with k = K (`pass_at_k`), averaged, Wilson interval;
    - maj@K: the share of tasks whose majority answer is right (`majority_correct`), Wilson interval;
    - no_box: the share of completions with no complete \\boxed{} (after </think>);
    - length: the mean completion length in tokens; timeouts / errors: the math checks that scored 0
      for running out of time or failing.

    >>> t = [{"rewards": [1.0, 0.0], "answers": ["1", "2"], "no_box": [False, True], "lengths": [10, 20],
    ...       "statuses": ["ok", "ok"]},
    ...      {"rewards": [0.0, 0.0], "answers": [None, "3"], "no_box": [True, False], "lengths": [30, 40],
    ...       "statuses": ["no_answer", "ok"]}]
    >>> s = answer_scores(t)
    >>> s["samples"], s["pass_at_1"]["value"], s["pass_at_k"]["value"], s["maj_at_k"]["value"], s["no_box"], s["length"]
    (2, 0.25, 0.5, 0.5, 0.5, 25.0)
    """
    n = len(per_task)
    k = min((len(t["rewards"]) for t in per_task), default=0)
    if n == 0 or k == 0:
        raise ValueError("answer_scores needs at least one task with at least one sample")
    p1 = [float(np.mean(t["rewards"])) for t in per_task]
    pk = [pass_at_k(len(t["rewards"]), int(sum(r >= 1.0 for r in t["rewards"])), k) for t in per_task]
    mj = [float(majority_correct(t["answers"], t["rewards"])) for t in per_task]

    def cell(scores: list[float]) -> dict:
        total = float(sum(scores))
        low, high = wilson_interval(min(total, n), n, z)
        return {"value": total / n, "ci_low": low, "ci_high": high, "n": n}

    flat = [x for t in per_task for x in t["no_box"]]
    statuses = [x for t in per_task for x in t.get("statuses") or [] if x is not None]
    return {
        "tasks": n,
        "samples": k,
        "pass_at_1": cell(p1),
        "pass_at_k": cell(pk),
        "maj_at_k": cell(mj),
        "no_box": float(np.mean(flat)),
        "length": float(np.mean([x for t in per_task for x in t["lengths"]])),
        "timeouts": statuses.count("timeout"),
        "errors": statuses.count("error"),
        "per_task_pass_at_1": p1,
    }
