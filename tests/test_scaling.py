"""The paper's scaling law P(C) = A / C^alpha + P* (Eq. 5): the fit recovers known parameters.

Run: .venv/bin/python -m pytest -q tests/test_scaling.py
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from rpttrain.scaling import NoFit, fit_scaling, r_squared, scaling_law

TRUE_ALPHA, TRUE_P_STAR = 0.3, 0.45
C0 = 1e15
TRUE_A = -0.2 * C0**TRUE_ALPHA  # 20 points below the asymptote at the smallest compute


def test_exact_points_are_recovered():
    c = np.logspace(15, 19, 9)
    a, alpha, p_star, r2 = fit_scaling(c, scaling_law(c, TRUE_A, TRUE_ALPHA, TRUE_P_STAR))
    assert alpha == pytest.approx(TRUE_ALPHA, rel=1e-4)
    assert p_star == pytest.approx(TRUE_P_STAR, abs=1e-5)
    assert a == pytest.approx(TRUE_A, rel=1e-3)
    assert r2 == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_noisy_points_are_recovered(seed):
    rng = np.random.default_rng(seed)
    c = np.logspace(15, 19, 12)
    y = scaling_law(c, TRUE_A, TRUE_ALPHA, TRUE_P_STAR) + rng.normal(0, 0.002, len(c))
    a, alpha, p_star, r2 = fit_scaling(c, y)
    assert alpha == pytest.approx(TRUE_ALPHA, abs=0.03)
    assert p_star == pytest.approx(TRUE_P_STAR, abs=0.01)
    # A itself moves exponentially with alpha; the gap it makes at the smallest compute is stable
    assert a / C0**alpha == pytest.approx(TRUE_A / C0**TRUE_ALPHA, abs=0.01)
    assert r2 > 0.99


def test_decreasing_accuracy_fits_with_positive_a():
    c = np.array([1e12, 3e12, 1e13, 3e13, 1e14])
    y = scaling_law(c, 0.1 * 1e12**0.5, 0.5, 0.2)
    a, alpha, p_star, r2 = fit_scaling(c, y)
    assert a > 0 and alpha == pytest.approx(0.5, rel=1e-3) and p_star == pytest.approx(0.2, abs=1e-4)


def test_points_without_compute_are_ignored_and_three_are_needed():
    c = [0.0, 1e15, 2e15, 4e15, 8e15]
    y = [0.1] + [float(scaling_law(x, TRUE_A, TRUE_ALPHA, TRUE_P_STAR)) for x in c[1:]]
    a, alpha, p_star, r2 = fit_scaling(c, y)  # the C = 0 point (0.1, far off the law) is not used
    assert r2 == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(NoFit, match="not enough points: 2"):
        fit_scaling([0.0, 1e15, 2e15], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="same length"):
        fit_scaling([1.0, 2.0, 3.0], [0.1, 0.2])


def test_r_squared():
    assert r_squared([1, 2, 3], [1, 2, 3]) == 1.0
    assert r_squared([1, 2, 3], [2, 2, 2]) == 0.0
    assert r_squared([1, 1, 1], [1, 1, 1]) == 1.0
    assert math.isnan(r_squared([1, 1, 1], [1, 2, 1]))


def test_doctests_of_scaling_and_eval_helpers():
    import doctest

    from rpttrain import data, scaling
    from rpttrain.eval import config, markdown, passes, report, run, stats, store, subjects

    for mod in (scaling, data, stats):
        result = doctest.testmod(mod)
        assert result.attempted > 0 and result.failed == 0, mod.__name__
    for mod in (config, markdown, passes, report, run, store, subjects):  # no examples yet; none may fail
        assert doctest.testmod(mod).failed == 0, mod.__name__


def test_runs_sharing_a_base_model_share_one_step0_line():
    from rpttrain.scaling import step0_lines

    def row(run, compute, acc, mode="ntp"):
        return {"run": run, "mode": mode, "compute": compute, "bands": {"hard": {"accuracy": acc}}}

    rows = [
        row("rpt", 0.0, 0.3),
        row("rpt", 1e12, 0.35),
        row("ntp", 0.0, 0.3),
        row("ntp", 1e12, 0.4),
        row("big", 0.0, 0.45),
        row("rpt", 0.0, 0.2, mode="reasoning"),
        row(None, None, 0.9),
        row("empty", 0.0, None),
    ]
    assert step0_lines(rows, "ntp", "hard") == [(30.0, ["rpt", "ntp"]), (45.0, ["big"])]
    assert step0_lines(rows, "reasoning", "hard") == [(20.0, ["rpt"])]


def test_three_points_are_refused_even_on_the_law():
    """Three points, three parameters: a family of curves fits exactly, so R² = 1 means nothing."""
    c = [1e15, 2e15, 4e15]
    with pytest.raises(NoFit, match="3 with compute > 0 for 3 parameters"):
        fit_scaling(c, [float(scaling_law(x, TRUE_A, TRUE_ALPHA, TRUE_P_STAR)) for x in c])


@pytest.mark.parametrize(
    "accuracy, bound",
    [
        ([0.20, 0.50, 0.50, 0.50, 0.50], "alpha = 5 (upper bound)"),  # a step: the law's alpha runs to its bound
        ([0.35, 0.36, 0.38, 0.42, 0.50], "P* = 1 (upper bound)"),  # accelerating: no asymptote below 100%
        ([0.50, 0.40, 0.45, 0.41, 0.44], "alpha = 5 (upper bound)"),  # noise around a level, as in issue 16
    ],
)
def test_fits_on_a_parameter_bound_are_refused(accuracy, bound):
    c = [1e15, 2e15, 4e15, 8e15, 1.6e16]
    with pytest.raises(NoFit, match="sits on a bound") as e:
        fit_scaling(c, accuracy)
    assert bound in str(e.value)


def test_eval_report_and_plot_legend_say_why_there_is_no_fit(tmp_path):
    from rptdata.bands import DEFAULT_BANDS
    from rpttrain.eval import EvalConfig, markdown
    from rpttrain.eval import report as eval_report
    from rpttrain.scaling import plot_scaling

    bands = dict(DEFAULT_BANDS)
    rows = [
        {
            "run": "r",
            "model": f"r@{i}",
            "step": i,
            "compute": c,
            "mode": "ntp",
            "bands": {b: {"accuracy": a, "n": 100} for b in [*bands, "all"]},
        }
        for i, (c, a) in enumerate([(0.0, 0.1), (1e15, 0.2), (2e15, 0.5), (4e15, 0.5), (8e15, 0.5), (1.6e16, 0.5)])
    ]
    fits = eval_report.scaling_fits(EvalConfig(tasks_dir="t", models=("m",)), rows)
    assert all(f["status"].startswith("no fit: the best fit sits on a bound") and f["A"] is None for f in fits)
    report = {"rows": rows, "bands": bands, "scaling": fits}
    table = markdown.format_scaling(report)
    assert "no fit: the best fit sits on a bound (alpha = 5 (upper bound))" in table and "e+" not in table
    fig = plot_scaling(report, tmp_path / "s.png")
    labels = [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]
    assert sum(label.startswith("r: no fit: the best fit sits on a bound") for label in labels) == len(
        bands
    )  # a panel per band
