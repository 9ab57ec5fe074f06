"""`rpt eval`'s report as Markdown: the paper's Table 1, the band counts, the paired differences,
the scaling fits (`rpt eval` prints the same tables) and a few examples (report.md only)."""

from __future__ import annotations

import json
from pathlib import Path

from rpttrain.eval.collapse import COLLAPSE_LEGEND, format_collapse
from rpttrain.eval.harness_report import format_harness
from rpttrain.samples import context_tail


def _pct(x: float | None, digits: int = 2) -> str:
    return "—" if x is None else f"{100 * x:.{digits}f}"


def _cell(stats: dict) -> str:
    if not stats["n"]:
        return "— (0)"
    return (
        f"{_pct(stats['accuracy'])} ({stats['correct']:g}/{stats['n']}; "
        f"{_pct(stats['ci_low'], 1)}–{_pct(stats['ci_high'], 1)})"
    )


def _compute_str(c: float | None) -> str:
    if c is None:
        return "—"
    return "0" if c == 0 else f"{c:.3g}"


def format_table(report: dict) -> str:
    """The paper's Table 1 as Markdown: rows model x mode (run x checkpoint x mode), columns bands.

    Each cell: accuracy % (correct/n; 95% Wilson interval %)."""
    bands = list(report["bands"].items())
    with_ckpt = any(r["run"] is not None for r in report["rows"])
    with_pass = any(r.get("pass_at_k") for r in report["rows"])
    k = max((r["samples"] for r in report["rows"] if r.get("pass_at_k")), default=1)
    head = ["model"] + (["step", "compute (FLOPs)"] if with_ckpt else []) + ["mode"]
    head += [f"{name} (H>{float(t)})" for name, t in bands] + ["all"]
    head += [f"Pass@{k} (all)"] if with_pass else []
    head += ["model entropy"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report["rows"]:
        cells = [r["model"]]
        if with_ckpt:
            cells += ["—" if r["step"] is None else str(r["step"]), _compute_str(r["compute"])]
        mode = r["mode"] if r.get("unit") in (None, "token") else f"{r['mode']}, {r['unit']}"
        cells.append(mode if r["mode"] == "ntp" or r["samples"] == 1 else f"{mode} (mean of {r['samples']})")
        cells += [_cell(r["bands"][name]) for name, _ in bands] + [_cell(r["bands"]["all"])]
        if with_pass:
            cells.append(_pct((r.get("pass_at_k") or {}).get("all")) if r.get("pass_at_k") else "—")
        cells.append("—" if r["model_entropy"] is None else f"{r['model_entropy']:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _start(started_from: dict | None) -> str:
    if not started_from:
        return "base model"
    return f"{Path(started_from['run_dir']).name}@{started_from['step']} ({started_from.get('objective') or '?'})"


def _ci(c: dict) -> str:
    return f"{_pct(c['value'])} ({_pct(c['ci_low'], 1)}–{_pct(c['ci_high'], 1)})"


def format_answer_table(report: dict) -> str:
    """Answer mode: one row per subject, pass@1, pass@K and maj@K with 95% Wilson intervals, the share
    of completions with no box, the mean length; empty string when no row is in answer mode."""
    rows = [r for r in report["rows"] if r["mode"] == "answer"]
    if not rows:
        return ""
    k = max(r["answer"]["samples"] for r in rows)
    head = ["model", "step", "compute (FLOPs)", "started from", "pass@1", f"pass@{k}", f"maj@{k}", "no box", "length"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        a = r["answer"]
        cells = [
            r["model"],
            "—" if r["step"] is None else str(r["step"]),
            _compute_str(r["compute"]),
            _start(r.get("started_from")) if r["run"] else "—",
            _ci(a["pass_at_1"]),
            _ci(a["pass_at_k"]),
            _ci(a["maj_at_k"]),
            f"{100 * a['no_box']:.0f}%",
            f"{a['length']:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_table2(report: dict) -> str:
    """The paper's Table 2: per RLVR run, pass@1 before (its start) and after (its last checkpoint),
    and the paired difference; empty string when there is none."""
    rows = report.get("table2") or []
    if not rows:
        return ""
    lines = [
        "| run | started from | steps | before (pass@1) | after (pass@1) | after − before |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['run']} | {_start(r['started_from'])} | {r['steps']} | {_pct(r['pass_at_1_before'])} | "
            f"{_pct(r['pass_at_1_after'])} | {_diff_cell(r['delta'])} |"
        )
    return "\n".join(lines)


def format_band_counts(report: dict) -> str:
    """Two lines: where the band entropy comes from, and the tasks per nested and disjoint band."""
    nested = report["band_counts"]["nested"]
    disjoint = report["band_counts"]["disjoint"]
    names = list(report["bands"])
    src = report["band_entropy"]
    source = (
        f"the band model {src['model']} (top-{src['top_k']}, {src['mode']})"
        if src["source"] == "band_model"
        else f"the tasks' entropy column (proxy: {src.get('proxy') or 'unknown'})"
    )
    nest = " ⊇ ".join(f"{n} {nested[n]}" for n in names)
    disj = " · ".join(f"{n} {disjoint[n]}" for n in ["other", *names])
    return (
        f"{report['tasks']} tasks from {report['documents']} documents ({report['split']} split); entropy from {source}.\n"
        f"Nested bands: {nest}. Disjoint: {disj}."
    )


def format_scaling(report: dict) -> str:
    """The scaling-law fits as Markdown (empty string when there are none)."""
    fits = report.get("scaling") or []
    if not fits:
        return ""
    lines = ["| run | mode | band | points | A | alpha | P* (%) | R² |", "|---|---|---|---|---|---|---|---|"]
    for f in fits:
        if f["points"] == 0 and f["band"] != "all":
            continue  # a band no task of this run falls in (answer tasks have none): nothing to fit or say
        if f["status"] != "ok":
            lines.append(f"| {f['run']} | {f['mode']} | {f['band']} | {f['points']} | {f['status']} | | | |")
            continue
        lines.append(
            f"| {f['run']} | {f['mode']} | {f['band']} | {f['points']} | {f['A']:.4g} | {f['alpha']:.4g} | "
            f"{100 * f['p_star']:.2f} | {f['r2']:.4f} |"
        )
    return "\n".join(lines)


def _diff_cell(d: dict) -> str:
    if not d["n"]:
        return "— (0)"
    if d["ci_low"] is None:
        return f"{100 * d['diff']:+.2f}"
    return (
        f"{100 * d['diff']:+.2f} ({100 * d['ci_low']:+.1f} to {100 * d['ci_high']:+.1f}; "
        f"{d['wins']}/{d['losses']}; p={d['p_value']:.2g})"
    )


def format_paired(report: dict) -> str:
    """Paired differences as Markdown (empty string when fewer than two models were evaluated)."""
    rows = report.get("paired") or []
    if not rows:
        return ""
    # a band no row has a task in (every band, for answer tasks) is left out
    names = [n for n in report["bands"] if any(r["bands"][n]["n"] for r in rows)] + ["all"]
    head = ["A − B", "mode"] + [f"{n}" for n in names]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append(
            "| " + " | ".join([f"{r['a']} − {r['b']}", r["mode"]] + [_diff_cell(r["bands"][n]) for n in names]) + " |"
        )
    return "\n".join(lines)


def _code(text: str | None) -> str:
    """Inline code of a quoted value (a leading space shows), on one line."""
    if text is None:
        return "(none)"
    quoted = json.dumps(text, ensure_ascii=False)
    return f"`` {quoted} ``" if "`" in quoted else f"`{quoted}`"


def format_examples(report: dict, context_chars: int = 80) -> str:
    """report.json's examples as Markdown: per model and mode, per band, right then wrong ones
    (context tail, prediction, target, reward); empty string when there are none."""
    lines = []
    for group in report.get("examples") or []:
        lines += [f"**{group['model']}**, {group['mode']}:", ""]
        for band, kinds in group["bands"].items():
            for kind in ("right", "wrong"):
                for ex in kinds[kind]:
                    lines.append(
                        f"- {band}, {kind}: `{ex['task_id']}` {_code(context_tail(ex['context'], context_chars))} → "
                        f"{_code(ex['prediction'])} "
                        f"(target {_code(ex['target'])}, reward {ex['reward']:g})"
                    )
        lines.append("")
    return "\n".join(lines).strip()


EXAMPLES_LEGEND = (
    "A few predictions per band, up to 2 right and 2 wrong, drawn with the evaluation's --seed; their "
    "completions and longer context tails are in report.json (`examples`), every prediction in predictions.parquet."
)


PAIRED_LEGEND = (
    "Accuracy points of A minus B on the same tasks: difference (95% interval; tasks only A got right / "
    "only B got right; p, exact McNemar). Compared: each --model, the base model, each run's last "
    "checkpoint."
)


def format_report_md(report: dict) -> str:
    """report.md: the tables above with their captions and the warnings first."""
    parts = ["# rpt eval", ""]
    parts += [
        f"Tasks: `{report['tasks_dir']}`"
        + ("" if report.get("unit") in (None, "token") else f" (unit: {report['unit']})")
        + f". Reward: {report['settings']['reward']} matching. "
        f"Cells: accuracy % (correct/n; 95% Wilson interval).",
        "",
    ]
    parts += [w for w in report["warnings"]] + ([""] if report["warnings"] else [])
    if "answer" in report["settings"]["modes"]:
        parts += [
            "## Answer accuracy",
            "",
            "Final answers checked with math-verify (the math reward). pass@1: mean over tasks of the mean reward "
            "of the K samples; pass@K: unbiased estimator; maj@K: the majority answer right; cells: % (95% Wilson "
            "interval over tasks). No box: completions without a complete \\boxed{}.",
            "",
            format_answer_table(report),
            "",
        ]
        if report.get("table2"):
            parts += [
                "## Before and after RLVR (the paper's Table 2)",
                "",
                "pass@1 of each run's start (step 0) and last checkpoint on the same held-out problems; the "
                "difference: points (95% interval; problems only after / only before got right; p).",
                "",
                format_table2(report),
                "",
            ]
    else:
        parts += [format_table(report), "", format_band_counts(report), ""]
    if format_collapse(report):
        parts += ["## Collapse monitor and response length", "", COLLAPSE_LEGEND, "", format_collapse(report), ""]
    if report.get("paired"):
        parts += ["## Paired differences", "", PAIRED_LEGEND, "", format_paired(report), ""]
    if report.get("scaling"):
        parts += [
            "## Scaling: P(C) = A / C^alpha + P*",
            "",
            f"Compute C: {report['compute_formula']}.",
            "",
            format_scaling(report),
            "",
        ]
        if report["files"].get("plot"):
            parts += [f"![accuracy against compute]({Path(report['files']['plot']).name})", ""]
    if report.get("lm_eval"):
        s = report["lm_eval"]["settings"]
        parts += [
            "## lm-evaluation-harness",
            "",
            f"Tasks {', '.join(s['tasks'])} (lm-eval; few-shot {s['fewshot'] if s['fewshot'] is not None else 'task default'}, "
            f"limit {s['limit'] or 'none'}); the harness's metrics, value ± stderr, beside the next-token accuracy.",
            "",
            format_harness(report),
            "",
        ]
        if report["files"].get("lm_eval_plot"):
            parts += [f"![lm-eval metrics against compute]({Path(report['files']['lm_eval_plot']).name})", ""]
    if report.get("examples"):
        parts += ["## Examples", "", EXAMPLES_LEGEND, "", format_examples(report), ""]
    return "\n".join(parts)
