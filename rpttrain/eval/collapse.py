"""`rpt eval --mode reasoning`: the collapse monitor per band, with response length beside accuracy.

    collapse_by_band(table, label, task_index, entropy, bands)   # -> {band: {...}} for report.json
    format_collapse(report)                                       # -> the Markdown table

Per nested band (as the accuracy table) and "all": accuracy, the mean response length in tokens
(`new_tokens`), and over each task's K samples the three figures of `rpttrain.collapse`
(distinct predictions, majority share, wrong-consensus share). A sample is right when its reward
is 1 (every reward gives exactly 1 to a right prediction and less to a wrong one). With K = 1
(the default greedy pass) the group figures say nothing and are None; ask for `--samples 8`.
Over the checkpoints of a run, the rows show whether responses grow while accuracy stays: the
"longer reasoning, same accuracy" signature.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rptdata.bands import as_bands
from rpttrain.collapse import COLLAPSE_KEYS, collapse_metrics


def collapse_by_band(table: pa.Table, label: str, task_index: dict[str, int], entropy, bands) -> dict | None:
    """{band: {tasks, accuracy, length_mean, distinct_predictions_mean, majority_share_mean,
    wrong_consensus_share}} of one subject's reasoning rows; None when it has none."""
    t = table.filter(pc.and_(pc.equal(table["model"], label), pc.equal(table["mode"], "reasoning")))
    if t.num_rows == 0:
        return None
    preds: dict[int, list] = {}
    right: dict[int, list] = {}
    lengths: dict[int, list] = {}
    for tid, p, r, n in zip(*(t.column(c).to_pylist() for c in ("task_id", "prediction", "reward", "new_tokens"))):
        i = task_index.get(tid)
        if i is None:
            continue
        preds.setdefault(i, []).append(p)
        right.setdefault(i, []).append(r >= 1.0)
        lengths.setdefault(i, []).append(n)
    h = np.asarray(entropy, dtype=np.float64)
    k = max(len(v) for v in preds.values())
    out = {}
    for name, threshold in [*as_bands(bands), ("all", None)]:
        idx = [i for i in sorted(preds) if threshold is None or h[i] > threshold]
        row = {
            "tasks": len(idx),
            "accuracy": float(np.mean([np.mean(right[i]) for i in idx])) if idx else None,
            "length_mean": float(np.mean([np.mean(lengths[i]) for i in idx])) if idx else None,
        }
        figs = collapse_metrics([(preds[i], right[i]) for i in idx]) if k > 1 else dict.fromkeys(COLLAPSE_KEYS)
        out[name] = {**row, **figs}
    return out


def _num(x, fmt: str) -> str:
    return "—" if x is None else format(x, fmt)


def format_collapse(report: dict) -> str:
    """Markdown: one line per reasoning row and band (empty string when there is none)."""
    rows = [r for r in report["rows"] if r.get("collapse")]
    if not rows:
        return ""
    lines = [
        "| model | step | band | tasks | accuracy % | response length | distinct predictions | majority share "
        "| wrong consensus |",
        "|" + "---|" * 9,
    ]
    for r in rows:
        for band, c in r["collapse"].items():
            lines.append(
                f"| {r['model']} | {'—' if r['step'] is None else r['step']} | {band} | {c['tasks']} | "
                f"{_num(None if c['accuracy'] is None else 100 * c['accuracy'], '.2f')} | {_num(c['length_mean'], '.1f')} | "
                f"{_num(c['distinct_predictions_mean'], '.2f')} | {_num(c['majority_share_mean'], '.2f')} | "
                f"{_num(c['wrong_consensus_share'], '.2f')} |"
            )
    return "\n".join(lines)


COLLAPSE_LEGEND = (
    "Reasoning mode, per band, over each task's samples: accuracy, mean response length (tokens), distinct "
    "predictions per task (of K, compared as NFC bytes), the most common prediction's share, and the share of tasks "
    "whose most common prediction is wrong and held by at least K/2 samples (rpttrain.collapse). Group figures need "
    "--samples > 1."
)
