"""`run_eval`: the stage, from a tasks directory and an EvalConfig to REPORT_DIR and the report.

Order: read the tasks and runs, check that they are held out (before anything is written), claim
REPORT_DIR, band entropies, each subject's missing rows (a subject making the same predictions
as an earlier one gets its rows copied), predictions.parquet, the report, lm-evaluation-harness
on each subject (`--lm-eval-tasks`, `rpttrain.eval.harness`); report.json last.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path

from rptdata import faults
from rptdata.bands import band_of
from rptdata.engine_choice import choose_engine
from rptdata.errors import BadOption, RptError
from rptdata.io import TASK_STAGES, read_manifest, write_json_atomic, write_parquet_atomic, write_text_atomic
from rptdata.models import resolve_device
from rpttrain.data import check_task_fit, load_tasks, task_unit
from rpttrain.eval.config import EvalConfig
from rpttrain.eval.harness import check_tasks, harness_scores
from rpttrain.eval.harness_report import harness_report, plot_harness
from rpttrain.eval.markdown import format_report_md
from rpttrain.eval.passes import Context, band_entropies, evaluate_subject
from rpttrain.eval.report import build_report
from rpttrain.eval.store import HARNESS_PLOT_FILE, PLOT_FILE, PREDICTIONS_DIR, PREDICTIONS_FILE, Store, claim_report_dir
from rpttrain.eval.subjects import check_runs, predictions_key, read_run, resolve_subjects, within_budget
from rpttrain.judge import judge_from_options
from rpttrain.prompts import UNIT_FORMATS
from rpttrain.reward import DENSE_REWARDS, JUDGE_REWARDS, get_reward_fn
from rpttrain.scaling import plot_scaling

log = logging.getLogger(__name__)


def run_eval(config: EvalConfig) -> dict:
    """Evaluate every subject in every mode on the tasks; write REPORT_DIR; return the report."""
    started = time.time()
    tasks_dir = Path(config.tasks_dir)
    manifest = read_manifest(tasks_dir, TASK_STAGES)
    check_task_fit(manifest, config.reward, config.prompt_template)
    unit = task_unit(manifest)
    if unit in ("masked-sentence", "span") and "ntp" in config.modes:
        raise BadOption(
            f"--mode {config.mode} predicts one greedy token of the context alone, and {unit} tasks hide a target "
            "between two texts: evaluate them with --mode reasoning"
        )
    tasks = load_tasks(tasks_dir, config.split, limit=config.limit)
    if not tasks:
        raise RptError(f"{tasks_dir}: the {config.split} split holds no tasks")
    runs = [read_run(r) for r in config.checkpoints]
    if config.max_compute is not None:
        runs = [within_budget(r, config.max_compute) for r in runs]
    warnings: list[str] = []
    overlap_report = check_runs(config, runs, tasks_dir, manifest, tasks, warnings)
    subjects = resolve_subjects(config, runs, UNIT_FORMATS[unit][0] if unit else "v0")
    if config.lm_eval_tasks:
        check_tasks(config.harness)  # lm-eval installed and the task names known, before any model loads

    tmp = ctx = None
    if config.out is None:
        tmp = tempfile.mkdtemp(prefix="rpt-eval-")
    out = Path(config.out or tmp)
    try:
        claim_report_dir(config, out, config.identity(manifest.get("fingerprint")))
        faults.hit("begin")
        entropy, entropy_source = band_entropies(config, out, tasks, manifest)
        ctx = Context(
            config,
            tasks,
            entropy,
            [band_of(h, config.bands) for h in entropy],
            Store(out),
            None if config.reward in DENSE_REWARDS + JUDGE_REWARDS else get_reward_fn(config.reward),
        )
        device = resolve_device(config.device)
        if config.judge:  # --reward judge: one judge for every subject
            ctx.judge = judge_from_options(config, device, choose_engine(config.engine, device), config.dtype)
        done = ctx.store.done() if config.resume else set()
        if done:
            log.info("resuming: %d (task, model, mode) rows already in %s", len(done), out / PREDICTIONS_DIR)
        infos = {}
        first_with: dict[tuple, str] = {}  # what a subject's predictions depend on -> first subject with it
        for subject in subjects:
            todo = {
                mode: [i for i, t in enumerate(tasks) if (t["task_id"], subject.label, mode) not in done]
                for mode in config.modes
            }
            twin = first_with.setdefault(predictions_key(subject, config.modes), subject.label)
            if twin != subject.label:  # e.g. the shared base model (step 0) of several runs: evaluated once
                infos[subject.label] = infos[twin]
                ctx.store.copy(
                    twin, subject.label, {(tasks[i]["task_id"], mode) for mode, idx in todo.items() for i in idx}
                )
                continue
            infos[subject.label] = evaluate_subject(ctx, subject, todo, device)
        table = ctx.store.table()
        write_parquet_atomic(table, out / PREDICTIONS_FILE)
        report = build_report(
            config, ctx, manifest, subjects, runs, infos, table, entropy_source, overlap_report, warnings
        )
        if config.lm_eval_tasks:  # lm-evaluation-harness on every subject, resumable per subject
            scores = harness_scores(
                config.harness, out, subjects, config.dtype, device, tasks_dir, manifest, config.trust_remote_code
            )
            report["lm_eval"] = harness_report(config.harness, subjects, scores)
            if runs and config.out is not None and plot_harness(report, out / HARNESS_PLOT_FILE):
                report["files"]["lm_eval_plot"] = str(out / HARNESS_PLOT_FILE)
        if runs and config.out is not None:
            plot = out / PLOT_FILE
            plot_scaling(report, plot)
            report["files"]["plot"] = str(plot)
        if ctx.judge is not None:  # this evaluation's calls, cache hits, unparseable verdicts, tokens
            report["judge"] = {"model": config.judge, **ctx.judge.take_counts()}
        report["seconds"] = round(time.time() - started, 2)
        write_text_atomic(out / "report.md", format_report_md(report))
        write_json_atomic(out / "report.json", report)  # last: its existence proves the evaluation finished
        return report
    finally:
        if ctx is not None and ctx.judge is not None:
            ctx.judge.close()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
