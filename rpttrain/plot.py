"""`rpt plot RUN_DIR`: training curves from metrics.jsonl as PNG files (matplotlib, no display).

RPT runs get reward/accuracy, completion length, zero-variance share and the collapse monitor
(`rpttrain.collapse`: majority share, wrong-consensus share, distinct predictions per group; a
panel is left empty for runs logged before it existed); RLP runs get the mean information gain,
the share of rollouts with a positive gain, the thought length and where the seconds went;
next-token baselines get loss, accuracy and the entropy of the trained distribution. Every panel is against the step, with
a secondary x label of cumulative training FLOPs at the last step.
"""

from __future__ import annotations

import json
from pathlib import Path

from rptdata.errors import MissingUpstream

PANELS = {
    "rpt": [
        ("reward", ["reward_mean", "accuracy"]),
        ("completion length", ["completion_len_mean", "completion_len_max"]),
        ("groups without signal", ["zero_variance_share"]),
        ("collapse: agreement in a group", ["majority_share_mean", "wrong_consensus_share"]),
        ("collapse: distinct predictions per group", ["distinct_predictions_mean"]),
        ("seconds per step", ["rollout_s", "update_s"]),
    ],
    "rlp": [
        ("information gain (nats)", ["information_gain_mean"]),
        ("rollouts with a positive gain", ["positive_gain_share"]),
        ("thought length", ["thought_len_mean", "thought_len_max"]),
        ("seconds per step", ["rollout_s", "score_s", "update_s", "ema_s"]),
    ],
    "ntp": [
        ("loss", ["loss"]),
        ("next-token accuracy", ["accuracy"]),
        ("entropy (nats)", ["entropy_mean"]),
        ("seconds per step", ["update_s"]),
    ],
}


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise MissingUpstream(f"{run_dir}: no metrics.jsonl; is this an `rpt train` run directory?")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_run(run_dir: Path, out: Path | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = read_metrics(run_dir)
    if not metrics:
        raise MissingUpstream(f"{run_dir}: metrics.jsonl is empty (no step finished yet)")
    kind = "rpt" if "reward_mean" in metrics[0] else "rlp" if "information_gain_mean" in metrics[0] else "ntp"
    steps = [m["step"] for m in metrics]
    panels = PANELS[kind]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    for ax, (title, keys) in zip(axes, panels):
        for key in keys:
            ys = [m.get(key) for m in metrics]
            if any(y is not None for y in ys):
                ax.plot(
                    steps,
                    [float("nan") if y is None else y for y in ys],
                    label=key,
                    marker="." if len(steps) < 50 else None,
                )
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(
        f"{Path(run_dir).name}: {kind}, {metrics[-1].get('flops_total', 0):.3g} training FLOPs by step {steps[-1]}",
        fontsize=10,
    )
    fig.tight_layout()
    out = Path(out) if out else Path(run_dir) / "curves.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
