"""The numbers of `rpt eval`'s report (report.json), from the stored predictions.

    build_report(config, ctx, manifest, subjects, runs, infos, table, ...) -> dict
        rows      per subject and mode: accuracy per band (Wilson intervals), Pass@K, model entropy, timing
        paired    paired differences between the endpoints (each --model, the base model, each run's last checkpoint)
        scaling   per run, mode and band: P(C) = A / C^alpha + P* over the checkpoints
        examples  per endpoint and mode, per band: a few right and wrong predictions (rpttrain.eval.examples)

How they are shown as Markdown: `rpttrain.eval.markdown`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rptdata.math_answers import after_think, last_boxed
from rpttrain.data import task_unit
from rpttrain.eval.collapse import collapse_by_band
from rpttrain.eval.config import STAGE, EvalConfig
from rpttrain.eval.examples import pick_examples
from rpttrain.eval.passes import Context
from rpttrain.eval.stats import answer_scores, band_table, disjoint_counts, paired_difference, pass_at_k
from rpttrain.eval.store import PREDICTIONS_DIR, PREDICTIONS_FILE
from rpttrain.eval.subjects import RunInfo, Subject, predictions_key
from rpttrain.scaling import MIN_POINTS, fit_scaling

FLOPS_FORMULA = (
    "rpt train: 6*N FLOPs per token through the update's forward and backward + 2*N per token the rollout "
    "engine runs through the model (a prompt once per sample it is computed for: once for one-token rollouts "
    "and vLLM's shared prefill, n times for transformers generate; fed-back generated tokens), "
    "N = model parameters; next-token baselines: 6*N per trained token"
)


def _aggregate(table: pa.Table, label: str, mode: str, task_index: dict[str, int]) -> dict | None:
    """Per task (in task order): mean reward, samples, correct samples, model entropy."""
    t = table.filter(pc.and_(pc.equal(table["model"], label), pc.equal(table["mode"], mode)))
    if t.num_rows == 0:
        return None
    n = len(task_index)
    total = np.zeros(n)
    count = np.zeros(n, dtype=np.int64)
    correct = np.zeros(n, dtype=np.int64)
    ment = np.full(n, np.nan)
    for tid, r, me in zip(
        t.column("task_id").to_pylist(), t.column("reward").to_pylist(), t.column("model_entropy").to_pylist()
    ):
        i = task_index.get(tid)
        if i is None:  # a task outside this evaluation (another --limit)
            continue
        total[i] += r
        count[i] += 1
        correct[i] += r >= 1.0  # right: 1 under every reward (a dense reward gives a wrong one its probability)
        if me is not None:
            ment[i] = me
    seen = count > 0
    return {
        "mean": np.where(seen, total / np.maximum(count, 1), 0.0),
        "count": count,
        "correct": correct,
        "seen": seen,
        "model_entropy": ment,
    }


def build_report(
    config: EvalConfig,
    ctx: Context,
    manifest: dict,
    subjects: list[Subject],
    runs: list[RunInfo],
    infos: dict,
    table: pa.Table,
    entropy_source: dict,
    overlap: list[dict],
    warnings: list[str],
) -> dict:
    """Everything report.json holds but `seconds` and the plot, which run_eval adds."""
    task_index = {t["task_id"]: i for i, t in enumerate(ctx.tasks)}
    entropy = np.asarray(ctx.entropy, dtype=np.float64)
    tasks_hash = (manifest.get("tokenizer") or {}).get("vocab_hash")
    rows = []
    means: dict[tuple[str, str], np.ndarray] = {}  # (label, mode) -> per-task score, for the paired table
    for subject in subjects:
        for mode in config.modes:
            agg = _aggregate(table, subject.label, mode, task_index)
            if agg is None:
                continue
            means[(subject.label, mode)] = agg["mean"]
            seen = agg["seen"]
            if not seen.all():  # an internal invariant: every task was evaluated or resumed
                raise AssertionError(f"{subject.label} {mode}: {int((~seen).sum())} tasks have no prediction")
            k = int(agg["count"].max())
            row = {
                "model": subject.label,
                "spec": subject.spec,
                "run": subject.run,
                "step": subject.step,
                "compute": subject.compute,
                "mode": mode,
                "unit": task_unit(manifest),
                "tasks": len(ctx.tasks),
                "samples": k,
                "bands": band_table(entropy, agg["mean"], config.bands),
                "model_entropy": None,
                "same_tokenizer_as_tasks": infos[subject.label]["vocab_hash"] == tasks_hash if tasks_hash else None,
            }
            if mode == "answer":
                row.update(
                    prompt_template=subject.prompt_template,
                    temperature=subject.temperature,
                    max_new_tokens=subject.max_new_tokens,
                    started_from=subject.started_from,
                    answer=_answer_row(table, subject.label, task_index),
                )
            elif mode == "reasoning":
                row.update(
                    prompt_template=subject.prompt_template,
                    temperature=subject.temperature,
                    max_new_tokens=subject.max_new_tokens,
                    collapse=collapse_by_band(table, subject.label, task_index, entropy, config.bands),
                )
                if k > 1:
                    passk = [pass_at_k(int(n), int(c), k) for n, c in zip(agg["count"], agg["correct"])]
                    row["pass_at_k"] = {b: v["accuracy"] for b, v in band_table(entropy, passk, config.bands).items()}
            else:
                me = agg["model_entropy"]
                row["model_entropy"] = float(np.nanmean(me)) if np.isfinite(me).any() else None
            seconds, evaluated = ctx.timings.get((subject.label, mode), [0.0, 0])
            row["evaluated_now"] = evaluated
            row["seconds"] = round(seconds, 3)
            row["tasks_per_s"] = evaluated / seconds if seconds > 0 else None
            rows.append(row)
    paired = _paired_rows(config, subjects, means, entropy)
    out = Path(ctx.store.dir).parent
    report = {
        "stage": STAGE,
        "tasks_dir": str(Path(config.tasks_dir).resolve()),
        "tasks_fingerprint": manifest.get("fingerprint"),
        # what the tasks predict (rpt make-tasks --unit): token, sentence, masked-sentence, span; None for answer tasks
        "unit": task_unit(manifest),
        "tokenizer": manifest.get("tokenizer"),
        "split": config.split,
        "tasks": len(ctx.tasks),
        "documents": len({t["doc_id"] for t in ctx.tasks}),
        "bands": {name: t for name, t in config.bands},
        "band_entropy": entropy_source,
        "band_counts": {
            "nested": {name: int((entropy > t).sum()) for name, t in config.bands},
            "disjoint": disjoint_counts(entropy, config.bands),
        },
        "settings": {
            "modes": list(config.modes),
            "samples": config.samples,
            "temperature": config.temperature,
            "max_new_tokens": config.max_new_tokens,
            "max_prompt_tokens": config.max_prompt_tokens,
            "prompt_template": config.prompt_template,
            "reward": config.reward,
            "seed": config.seed,
            "engine": config.engine,
            "dtype": config.dtype,
            "device": config.device,
            "batch_size": config.batch_size,
            "limit": config.limit,
            "resume": config.resume,
            "max_compute": config.max_compute,
        },
        "overlap": overlap,
        "warnings": warnings,
        "rows": rows,
        "compute_formula": FLOPS_FORMULA if runs else None,
        "scaling": scaling_fits(config, rows),
        "paired": paired,
        "table2": _table2(subjects, means) if "answer" in config.modes else [],
        "examples": pick_examples(
            table,
            ctx.tasks,
            [(s.label, mode) for s in _endpoints(subjects, config.modes) for mode in config.modes],
            [name for name, _ in config.bands],
            config.seed,
        ),
        "files": {
            "report_md": str(out / "report.md") if config.out else None,
            "report_json": str(out / "report.json") if config.out else None,
            "predictions": str(out / PREDICTIONS_FILE) if config.out else None,
            "predictions_parts": str(out / PREDICTIONS_DIR) if config.out else None,
        },
    }
    return report


def _answer_row(table: pa.Table, label: str, task_index: dict[str, int]) -> dict:
    """answer_scores of one subject from its stored predictions (every figure recounted from them)."""
    t = table.filter(pc.and_(pc.equal(table["model"], label), pc.equal(table["mode"], "answer")))
    per_task = [{"rewards": [], "answers": [], "no_box": [], "lengths": [], "statuses": []} for _ in task_index]
    for r in t.select(["task_id", "sample", "prediction", "reward", "new_tokens", "completion", "status"]).to_pylist():
        i = task_index.get(r["task_id"])
        if i is None:
            continue
        p = per_task[i]
        p["rewards"].append(r["reward"])
        p["answers"].append(r["prediction"])
        p["no_box"].append(last_boxed(after_think(r["completion"] or "")) is None)
        p["lengths"].append(r["new_tokens"])
        p["statuses"].append(r["status"])
    scores = answer_scores(per_task)
    scores.pop("per_task_pass_at_1")
    return scores


def _table2(subjects: list[Subject], means: dict) -> list[dict]:
    """The paper's Table 2 from the runs evaluated: per run, its start (step 0: the model or the
    checkpoint of another run it started from) before, its last checkpoint after, and the paired
    difference after - before of pass@1 on the same tasks."""
    rows = []
    runs = list(dict.fromkeys(s.run for s in subjects if s.run is not None))
    for run in runs:
        mine = [s for s in subjects if s.run == run]
        before = next((s for s in mine if s.step == 0), None)
        after = max((s for s in mine if s.step), key=lambda s: s.step, default=None)
        if before is None or after is None:
            continue
        a, b = means.get((after.label, "answer")), means.get((before.label, "answer"))
        if a is None or b is None:
            continue
        rows.append(
            {
                "run": run,
                "started_from": before.started_from,
                "before": before.label,
                "after": after.label,
                "steps": after.step,
                "compute": after.compute,
                "pass_at_1_before": float(np.mean(b)),
                "pass_at_1_after": float(np.mean(a)),
                "delta": paired_difference(a, b),
            }
        )
    return rows


def _endpoints(subjects: list[Subject], modes: Sequence[str]) -> list[Subject]:
    """What the paired table compares: each --model, the base model (once), each run's last checkpoint."""
    last: dict[str, Subject] = {}
    for s in subjects:
        if s.run is not None and s.step:
            if s.run not in last or s.step > last[s.run].step:
                last[s.run] = s
    chosen, keys = [], set()
    for s in subjects:
        if s.run is not None and s.step and last.get(s.run) is not s:
            continue
        key = predictions_key(s, modes)
        if key not in keys:  # the base model of several runs appears once
            keys.add(key)
            chosen.append(s)
    return chosen


def _paired_rows(config, subjects, means: dict, entropy) -> list[dict]:
    """Paired differences, band by band, between every two endpoints (see _endpoints), from the
    per-task scores `means[(label, mode)]` the report rows were built from."""
    ends = _endpoints(subjects, config.modes)
    masks = {name: entropy > t for name, t in config.bands}
    masks["all"] = np.ones(len(entropy), dtype=bool)
    rows = []
    for mode in config.modes:
        scores = {s.label: means[(s.label, mode)] for s in ends if (s.label, mode) in means}
        labels = list(scores)
        for i, a in enumerate(labels):
            for b in labels[i + 1 :]:
                bands = {band: paired_difference(scores[b][m], scores[a][m]) for band, m in masks.items()}
                rows.append({"mode": mode, "a": b, "b": a, "bands": bands})
    return rows


def scaling_fits(config: EvalConfig, rows: list[dict]) -> list[dict]:
    """P(C) = A / C^alpha + P* per run, mode and band, on the rows with compute C > 0 (at least MIN_POINTS)."""
    fits = []
    run_names = []
    for r in rows:
        if r["run"] is not None and r["run"] not in run_names:
            run_names.append(r["run"])
    for run in run_names:
        for mode in config.modes:
            mine = [r for r in rows if r["run"] == run and r["mode"] == mode]
            if not mine:
                continue
            for band in [name for name, _ in config.bands] + ["all"]:
                pts = [
                    (r["compute"], r["bands"][band]["accuracy"])
                    for r in mine
                    if r["compute"] is not None and r["compute"] > 0 and r["bands"][band]["accuracy"] is not None
                ]
                fit = {
                    "run": run,
                    "mode": mode,
                    "band": band,
                    "points": len(pts),
                    "A": None,
                    "alpha": None,
                    "p_star": None,
                    "r2": None,
                }
                if len(pts) < MIN_POINTS:
                    fit["status"] = f"no fit: {len(pts)} points with compute > 0 for 3 parameters (need {MIN_POINTS})"
                elif len({p[1] for p in pts}) == 1:  # R² is undefined and alpha arbitrary on a flat line
                    fit.update(A=0.0, p_star=pts[0][1], status=f"flat: every point at {100 * pts[0][1]:.2f}%")
                else:
                    try:
                        a, alpha, p_star, r2 = fit_scaling([p[0] for p in pts], [p[1] for p in pts])
                        fit.update(A=a, alpha=alpha, p_star=p_star, r2=r2, status="ok")
                    except (RuntimeError, ValueError) as e:
                        fit["status"] = f"no fit: {e}"  # NoFit (a ValueError) says why
                fits.append(fit)
    return fits
