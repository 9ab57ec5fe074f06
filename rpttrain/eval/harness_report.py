"""The lm-evaluation-harness part of `rpt eval`'s report: report.json's `lm_eval`, report.md's
tables (one per harness task: each metric ± stderr per model, beside next-token accuracy) and,
for checkpoints, lm_eval.png (each metric against training compute, one line per run, the base
model at C = 0 as a dotted line).

    report["lm_eval"] = harness_report(config.harness, subjects, scores)
    format_harness(report) -> Markdown;  plot_harness(report, "out/eval/lm_eval.png")
"""

from __future__ import annotations

from dataclasses import asdict


def harness_report(settings, subjects: list, scores: dict[str, dict]) -> dict:
    """{"settings", "subjects": [{model, run, step, compute, lm_eval: {task: {metric: value}}}]}."""
    return {
        "settings": {**asdict(settings), "tasks": list(settings.tasks)},
        "subjects": [
            {"model": s.label, "run": s.run, "step": s.step, "compute": s.compute, "lm_eval": scores[s.label]}
            for s in subjects
            if s.label in scores
        ],
    }


COUNTS = ("sample_len",)  # the harness's count of documents, not a metric


def split_metric(key: str) -> tuple[str, str | None, bool]:
    """The harness's key -> (metric, filter, is_stderr).

    >>> split_metric("bits_per_byte,none"), split_metric("acc_stderr,none"), split_metric("samples")
    (('bits_per_byte', 'none', False), ('acc', 'none', True), ('samples', None, False))
    """
    name, _, filt = key.partition(",")
    stderr = name.endswith("_stderr")
    return (name[: -len("_stderr")] if stderr else name), (filt or None), stderr


def metric_keys(report: dict, task: str) -> list[str]:
    """The value keys (not stderr) of a task, in the harness's order, over every subject."""
    keys: list[str] = []
    for s in report["lm_eval"]["subjects"]:
        for k, v in (s["lm_eval"].get(task) or {}).items():
            if not split_metric(k)[2] and k not in COUNTS and isinstance(v, (int, float)) and k not in keys:
                keys.append(k)
    return keys


def _stderr_key(key: str) -> str:
    name, filt, _ = split_metric(key)
    return f"{name}_stderr" + (f",{filt}" if filt else "")


def _value(v) -> str:
    return "—" if v is None else f"{v:.5g}"


def format_harness(report: dict) -> str:
    """One Markdown table per harness task (empty string without --lm-eval-tasks)."""
    h = report.get("lm_eval")
    if not h:
        return ""
    ntp = {r["model"]: r["bands"]["all"]["accuracy"] for r in report["rows"] if r["mode"] == "ntp"}
    with_ckpt = any(s["run"] is not None for s in h["subjects"])
    tasks = list(dict.fromkeys(t for s in h["subjects"] for t in s["lm_eval"]))
    parts = []
    for task in tasks:
        keys = metric_keys(report, task)
        head = ["model"] + (["step", "compute (FLOPs)"] if with_ckpt else []) + ["documents"]
        head += [k.replace(",none", "") for k in keys]
        head += ["next-token accuracy (all)"] if ntp else []
        lines = [f"### {task}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for s in h["subjects"]:
            m = s["lm_eval"].get(task) or {}
            cells = [s["model"]]
            if with_ckpt:
                cells += [
                    "—" if s["step"] is None else str(s["step"]),
                    "—" if s["compute"] is None else ("0" if s["compute"] == 0 else f"{s['compute']:.3g}"),
                ]
            cells.append(str(m.get("sample_len", "—")))
            for k in keys:
                err = m.get(_stderr_key(k))
                cells.append(_value(m.get(k)) + (f" ± {err:.2g}" if isinstance(err, (int, float)) else ""))
            if ntp:
                acc = ntp.get(s["model"])
                cells.append("—" if acc is None else f"{100 * acc:.2f}")
            lines.append("| " + " | ".join(cells) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def plot_harness(report: dict, path) -> bool:
    """Each (task, metric) against training compute, one line per run; False when no run has a
    checkpoint with compute > 0 (nothing to plot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    subjects = [s for s in report["lm_eval"]["subjects"] if s["run"] is not None]
    if not any(s["compute"] for s in subjects):
        return False
    runs = list(dict.fromkeys(s["run"] for s in subjects))
    panels = [(t, k) for t in dict.fromkeys(t for s in subjects for t in s["lm_eval"]) for k in metric_keys(report, t)]
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig = Figure(figsize=(4.4 * cols, 3.4 * rows))
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    for i, (task, key) in enumerate(panels):
        ax = axes[i // cols][i % cols]
        for j, run in enumerate(runs):
            mine = [(s["compute"], (s["lm_eval"].get(task) or {}).get(key)) for s in subjects if s["run"] == run]
            pts = sorted((c, v) for c, v in mine if c and v is not None)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=f"C{j % 10}", linewidth=1, label=run)
        base: dict[float, list[str]] = {}  # the base model, once per value (runs usually share it)
        for s in subjects:
            v = (s["lm_eval"].get(task) or {}).get(key)
            if s["compute"] == 0 and v is not None and s["run"] not in base.setdefault(v, []):
                base[v].append(s["run"])
        for v, names in base.items():
            color = f"C{runs.index(names[0]) % 10}" if len(names) == 1 else "0.4"
            ax.axhline(v, color=color, linestyle=":", linewidth=1, label=f"step 0 ({', '.join(names)})")
        xs = [s["compute"] for s in subjects if s["compute"]]
        if max(xs) >= 10 * min(xs):  # log only over a decade or more (else its ticks are unlabelled)
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())
        else:
            ax.ticklabel_format(axis="x", style="sci", scilimits=(0, 0))
        ax.set_xlabel("training compute (FLOPs)")
        ax.set_title(f"{task}: {key.replace(',none', '')}", fontsize=9)
        ax.legend(fontsize=7)
    for i in range(len(panels), rows * cols):
        axes[i // cols][i % cols].set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True
