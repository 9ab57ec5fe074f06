"""The paper's compute scaling law (Eq. 5): accuracy against training compute.

    P(C) = A / C**alpha + P*

C is training compute in FLOPs, P the next-token accuracy (a fraction in [0, 1]) and P* the
accuracy the law tends to as compute grows; with accuracy rising with compute, A is negative.
The paper fits it per entropy band on checkpoints at steps 100..1,200 and reports R² of
0.995 / 0.997 / 0.989 on its easy / medium / hard splits.

`fit_scaling` works in normalized compute x = C / C0 (C0 = the smallest compute), where the
gap a = A / C0**alpha is of the order of the accuracies themselves, so the optimizer sees numbers
near 1 instead of FLOP counts near 1e18; A is converted back on return. Bounds: alpha in
[1e-4, 5], P* in [0, 1], a in [-2, 2]. Several starting values of alpha are tried and the fit
with the smallest squared error wins.

A fit is refused (`NoFit`, with the reason) rather than reported when it cannot mean anything:
with no more points than the law's three parameters (three points are fit exactly by a whole
family of curves, so R² says nothing), or when the best fit sits on a parameter bound (the data
do not determine that parameter; the bound chose it). Callers print the reason instead of
numbers; `rpt eval` puts it in the report's table and in the plot's legend.

`plot_scaling(report, path)` draws an `rpt eval` report's checkpoint rows: accuracy against
compute per (mode, band), one color per run, with the fitted curves (matplotlib, Agg canvas).

Left out on purpose: weighting points by their confidence intervals (the paper does not), and
any extrapolation beyond the measured compute (callers plot the curve over the measured range).

Run the examples with ``python -m doctest rpttrain/scaling.py``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np

__all__ = ["MIN_POINTS", "NoFit", "fit_scaling", "plot_scaling", "r_squared", "scaling_law"]

N_PARAMS = 3  # A, alpha, P*
MIN_POINTS = N_PARAMS + 1  # more points than parameters: with 3, a family of curves fits exactly
# bounds of the normalized fit (gap a = A / C0**alpha, alpha, P*); a parameter within BOUND_TOL
# of the bound's range from one of them is "at the bound"
BOUNDS = {"a": (-2.0, 2.0), "alpha": (1e-4, 5.0), "P*": (0.0, 1.0)}
BOUND_TOL = 1e-3


class NoFit(ValueError):
    """The points cannot support a fit of the law; the message says why."""


def scaling_law(compute, a: float, alpha: float, p_star: float):
    """P(C) = A / C**alpha + P* (works on floats and numpy arrays).

    >>> round(float(scaling_law(100.0, -1.0, 0.5, 0.5)), 4)
    0.4
    """
    return a / np.power(compute, alpha) + p_star


def r_squared(y: Sequence[float], y_hat: Sequence[float]) -> float:
    """Coefficient of determination 1 - SS_res / SS_tot (1.0 for a perfect fit of constant data,
    NaN when constant data are not fit exactly).

    >>> r_squared([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    1.0
    >>> r_squared([1.0, 2.0, 3.0], [2.0, 2.0, 2.0])
    0.0
    """
    y = np.asarray(y, dtype=float)
    y_hat = np.asarray(y_hat, dtype=float)
    ss_res = float(((y - y_hat) ** 2).sum())
    ss_tot = float(((y - y.mean()) ** 2).sum())
    if ss_tot == 0.0:
        return 1.0 if ss_res <= 1e-24 else float("nan")
    return 1.0 - ss_res / ss_tot


def fit_scaling(compute: Sequence[float], accuracy: Sequence[float]) -> tuple[float, float, float, float]:
    """Fit P(C) = A / C**alpha + P* by least squares; return (A, alpha, P*, R²).

    Only points with C > 0 are used (a base model at C = 0 has no place on the law); more such
    points than the law's 3 parameters are needed, and the best fit must not sit on a parameter
    bound, else NoFit (a ValueError) says why. `accuracy` is a fraction in [0, 1]. RuntimeError
    when no start converges.

    >>> C = [1e15, 2e15, 4e15, 8e15, 1.6e16, 3.2e16]
    >>> P = [scaling_law(c, -3e3, 0.25, 0.5) for c in C]
    >>> A, alpha, p_star, r2 = fit_scaling(C, P)
    >>> round(alpha, 3), round(p_star, 3), round(A / -3e3, 3), round(r2, 6)
    (0.25, 0.5, 1.0, 1.0)
    >>> try:
    ...     fit_scaling([0.0, 1e15, 2e15, 4e15], [0.1, 0.2, 0.3, 0.35])
    ... except NoFit as e:
    ...     print(e)
    not enough points: 3 with compute > 0 for 3 parameters (need at least 4)
    """
    from scipy.optimize import OptimizeWarning, curve_fit

    c = np.asarray(compute, dtype=float)
    y = np.asarray(accuracy, dtype=float)
    if c.shape != y.shape:
        raise ValueError(f"compute and accuracy must have the same length, not {c.shape} and {y.shape}")
    keep = np.isfinite(c) & np.isfinite(y) & (c > 0)
    c, y = c[keep], y[keep]
    if len(c) < MIN_POINTS:
        raise NoFit(
            f"not enough points: {len(c)} with compute > 0 for {N_PARAMS} parameters (need at least {MIN_POINTS})"
        )
    c0 = float(c.min())
    x = c / c0

    def law(xs, gap, alpha, p_star):
        return gap * np.power(xs, -alpha) + p_star

    bounds = tuple(list(b) for b in zip(*BOUNDS.values()))
    best, best_sse, last_error = None, math.inf, None
    first = float(y[np.argmin(x)])
    for alpha0 in (0.05, 0.2, 0.5, 1.0, 2.0):
        # the asymptote lies beyond the last point in the direction the data move
        last = float(y[np.argmax(x)])
        p0_star = float(np.clip(last + 0.5 * (last - first), 0.0, 1.0))
        p0 = [float(np.clip(first - p0_star, -2.0, 2.0)), alpha0, p0_star]
        try:
            with warnings.catch_warnings():  # the covariance is not used; exact fits cannot estimate it
                warnings.simplefilter("ignore", OptimizeWarning)
                params, _ = curve_fit(law, x, y, p0=p0, bounds=bounds, maxfev=20000)
        except (RuntimeError, ValueError) as e:  # no convergence from this start
            last_error = e
            continue
        sse = float(((law(x, *params) - y) ** 2).sum())
        if sse < best_sse:
            best, best_sse = params, sse
    if best is None:
        raise RuntimeError(f"the scaling fit did not converge: {last_error}")
    gap, alpha, p_star = (float(v) for v in best)
    at_bound = bound_hits(dict(zip(BOUNDS, (gap, alpha, p_star))))
    if at_bound:
        raise NoFit(f"the best fit sits on a bound ({'; '.join(at_bound)}): the points do not determine it")
    a = gap * c0**alpha
    return a, alpha, p_star, r_squared(y, scaling_law(c, a, alpha, p_star))


def bound_hits(params: dict[str, float]) -> list[str]:
    """The fitted (normalized) parameters that sit on one of BOUNDS, described.

    >>> bound_hits({"a": -0.3, "alpha": 5.0, "P*": 0.4})
    ['alpha = 5 (upper bound)']
    >>> bound_hits({"a": -0.3, "alpha": 0.7, "P*": 0.4})
    []
    """
    hits = []
    for name, value in params.items():
        lo, hi = BOUNDS[name]
        tol = BOUND_TOL * (hi - lo)
        if value <= lo + tol:
            hits.append(f"{name} = {value:.4g} (lower bound)")
        elif value >= hi - tol:
            hits.append(f"{name} = {value:.4g} (upper bound)")
    return hits


def step0_lines(rows: list[dict], mode: str, band: str) -> list[tuple[float, list[str]]]:
    """The step-0 (base model) accuracies in % of the runs, one entry per distinct value with the
    runs that share it: runs trained from one base model get one line in the plot, not one each.

    >>> rows = [{"run": r, "mode": "ntp", "compute": 0.0, "bands": {"all": {"accuracy": a}}}
    ...         for r, a in [("rpt", 0.5), ("ntp", 0.5), ("other", 0.25)]]
    >>> step0_lines(rows, "ntp", "all")
    [(50.0, ['rpt', 'ntp']), (25.0, ['other'])]
    """
    lines: dict[float, list[str]] = {}
    for r in rows:
        acc = r["bands"][band]["accuracy"]
        if r["run"] is not None and r["mode"] == mode and r["compute"] == 0 and acc is not None:
            names = lines.setdefault(100 * acc, [])
            if r["run"] not in names:
                names.append(r["run"])
    return list(lines.items())


def plot_scaling(report: dict, path):
    """Accuracy against training compute, one color per run, one panel per (mode, band); the fitted
    law as a dashed curve over the measured range, the base model (C = 0) as a dotted line. A run
    without a fit gets the reason in its panel's legend. Returns the matplotlib Figure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [r for r in report["rows"] if r["run"] is not None]
    modes = [m for m in ("ntp", "reasoning") if any(r["mode"] == m for r in rows)]
    bands = list(report["bands"])
    runs = list(dict.fromkeys(r["run"] for r in rows))
    fits = {(f["run"], f["mode"], f["band"]): f for f in report.get("scaling") or []}
    fig = Figure(figsize=(4.2 * len(bands), 3.4 * max(len(modes), 1)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(max(len(modes), 1), len(bands), squeeze=False)
    colors = [f"C{i % 10}" for i in range(len(runs))]
    no_fit_panels: set[tuple[int, int]] = set()
    for mi, mode in enumerate(modes):
        for bi, band in enumerate(bands):
            ax = axes[mi][bi]
            for run, color in zip(runs, colors):
                mine = [
                    r
                    for r in rows
                    if r["run"] == run and r["mode"] == mode and r["bands"][band]["accuracy"] is not None
                ]
                pts = sorted(
                    (r["compute"], 100 * r["bands"][band]["accuracy"])
                    for r in mine
                    if r["compute"] and r["compute"] > 0
                )
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=color, linewidth=1, label=run)
                f = fits.get((run, mode, band))
                if f and f["status"] == "ok" and pts:
                    xs = np.logspace(np.log10(pts[0][0]), np.log10(pts[-1][0]), 100)
                    ax.plot(
                        xs,
                        100 * scaling_law(xs, f["A"], f["alpha"], f["p_star"]),
                        "--",
                        color=color,
                        label=f"{run} fit R²={f['r2']:.3f}",
                    )
                elif f and pts:  # say why there is no curve, in this panel's legend
                    ax.plot([], [], " ", label=f"{run}: {f['status']}")
                    no_fit_panels.add((mi, bi))
            for value, names in step0_lines(rows, mode, band):
                color = colors[runs.index(names[0])] if len(names) == 1 else "0.4"
                ax.axhline(value, color=color, linestyle=":", linewidth=1, label=f"step 0 ({', '.join(names)})")
            if any(r["compute"] and r["compute"] > 0 for r in rows):
                ax.set_xscale("log")
            top = max(
                [
                    100 * r["bands"][band]["accuracy"]
                    for r in rows
                    if r["mode"] == mode and r["bands"][band]["accuracy"] is not None
                ]
                or [0.0]
            )
            ax.set_ylim(0, max(5.0, 1.15 * top))
            ax.set_title(f"{mode} · {band} (H>{float(report['bands'][band])})", fontsize=10)
            ax.set_xlabel("training compute (FLOPs)")
            ax.set_ylabel("accuracy (%)")
            ax.grid(True, alpha=0.3)
            if (mi == 0 and bi == 0) or (mi, bi) in no_fit_panels:
                ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return fig
