"""What `rpt eval` evaluates, and the check that it is held out.

    runs = [read_run("out/run")]                       # RUN/config.yaml, RUN/trained_on.json, checkpoints
    subjects = resolve_subjects(config, runs)          # every --model, each run's base model and checkpoints
    check_runs(config, runs, tasks_dir, manifest, tasks, warnings)   # EvalOverlap if a run saw these documents

The held-out check reads what the run recorded it trained on (RUN/trained_on.json, written by
`rpt train`; `rpttrain.data.trained_on_record`) instead of re-deriving it from the run's config.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import yaml

from rptdata.errors import DamagedFile, MissingUpstream, RptError
from rptdata.io import read_json, read_manifest
from rptdata.models import model_name
from rptdata.tasks.taskdef import recorded_split_rule, split_of
from rpttrain.data import TRAINED_ON, iter_tasks
from rpttrain.eval.config import DEFAULT_REASONING_TOKENS, EvalConfig
from rpttrain.prompts import ANSWER_FORMATS, load_prompt_format

log = logging.getLogger(__name__)


class EvalOverlap(RptError):
    """A checkpoint's training run saw some of the evaluated documents."""


@dataclass(frozen=True)
class RunInfo:
    """A `rpt train` run directory, as eval needs it."""

    name: str
    dir: Path
    config: dict
    model: str  # the base model spec (resolved path when it is a local one)
    tasks_dir: Path | None  # None when it is not there any more
    checkpoints: tuple[tuple[int, Path, float], ...]  # (step, folder, training FLOPs), oldest first
    trained_on: dict | None = None  # RUN/trained_on.json; None for runs made before train wrote it


@dataclass(frozen=True)
class Subject:
    """One row group of the report: a model, or one checkpoint (or base) of a run."""

    label: str
    spec: str  # what load_causal_lm / load_tokenizer get
    run: str | None = None
    step: int | None = None
    compute: float | None = None
    prompt_template: str = "v0"
    max_new_tokens: int = DEFAULT_REASONING_TOKENS
    temperature: float = 0.0
    started_from: dict | None = None  # the run's own start: another run's checkpoint (checkpoint_origin)


def _local_path(value: str, run_dir: Path) -> Path | None:
    """A path named in a run's files: as given, else relative to the run or its parent."""
    p = Path(value).expanduser()
    for candidate in (p, run_dir / p, run_dir.parent / p):
        if candidate.exists():
            return candidate.resolve()
    return None


def read_run(run_dir: str | Path) -> RunInfo:
    """Read a run's config.yaml, its trained_on.json and its complete checkpoints (step, folder, totals.flops)."""
    # rpttrain.checkpoint imports torch at module top; kept lazy so the config and stats load without it
    from rpttrain.checkpoint import list_checkpoints, verify_checkpoint

    root = Path(run_dir).resolve()
    cfg_path = root / "config.yaml"
    if not cfg_path.exists():
        raise MissingUpstream(f"{run_dir}: no config.yaml; not an `rpt train` run directory")
    try:
        config = yaml.safe_load(cfg_path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise DamagedFile(
            f"{cfg_path}: damaged, not valid YAML ({e}); `rpt train ... --out {root} --resume` writes it again"
        ) from None
    for key in ("model", "tasks_dir"):
        if not isinstance(config, dict) or key not in config:
            raise MissingUpstream(f"{cfg_path} has no {key!r}; not an `rpt train` config")
    record_path = root / TRAINED_ON
    trained_on = (
        read_json(record_path, f"`rpt train ... --out {root} --resume` writes it again")
        if record_path.exists()
        else None
    )
    model_path = _local_path(str(config["model"]), root)
    tasks_dir = _local_path(str(trained_on["tasks_dir"]), root) if trained_on else None
    checkpoints = []
    for folder in list_checkpoints(root):
        state = verify_checkpoint(folder)  # the weights' sizes and checksums, before eval loads them
        flops = float((state.get("totals") or {}).get("flops", float("nan")))
        checkpoints.append((int(state.get("step", folder.name.split("-")[-1])), folder, flops))
    return RunInfo(
        name=root.name,
        dir=root,
        config=config,
        model=str(model_path) if model_path else str(config["model"]),
        tasks_dir=tasks_dir or _local_path(str(config["tasks_dir"]), root),
        checkpoints=tuple(checkpoints),
        trained_on=trained_on,
    )


def within_budget(run: RunInfo, max_compute: float) -> RunInfo:
    """The run with only the checkpoints that spent at most `max_compute` training FLOPs."""
    kept = tuple(c for c in run.checkpoints if c[2] <= max_compute)
    if len(kept) < len(run.checkpoints):
        log.info(
            "%s: %d checkpoint(s) over --max-compute %.3g left out",
            run.dir,
            len(run.checkpoints) - len(kept),
            max_compute,
        )
    return replace(run, checkpoints=kept)


def resolve_subjects(config: EvalConfig, runs: list[RunInfo], default_template: str = "v0") -> list[Subject]:
    """Every --model, then per run its base model (step 0, compute 0) and each checkpoint, labelled uniquely.
    `default_template`: the format of a subject with none of its own (v0; the unit's for sentence and span tasks)."""

    def new_tokens(template: str, run_value) -> int:
        if config.max_new_tokens is not None:
            return config.max_new_tokens
        if run_value:
            return int(run_value)
        return 1 if not load_prompt_format(template).uses_chat else DEFAULT_REASONING_TOKENS

    def temperature(run_value) -> float:
        if config.temperature is not None:
            return config.temperature
        if config.samples == 1:
            return 0.0
        return float(run_value) if run_value else 0.8

    subjects: list[Subject] = []
    used: set[str] = set()

    def unique(label: str) -> str:
        out, i = label, 2
        while out in used:
            out, i = f"{label}#{i}", i + 1
        used.add(out)
        return out

    answer = "answer" in config.modes  # answer tasks: an answer format, whatever the run trained with

    def own_template(run_value) -> str:
        if config.prompt_template:
            return config.prompt_template
        if answer:
            return run_value if run_value in ANSWER_FORMATS else ANSWER_FORMATS[0]
        return run_value or default_template

    for spec in config.models:
        template = own_template(None)
        subjects.append(
            Subject(
                unique(model_name(spec)),
                spec,
                prompt_template=template,
                max_new_tokens=new_tokens(template, None),
                temperature=temperature(None),
            )
        )
    names = [r.name for r in runs]
    for run in runs:
        rc = run.config
        name = run.name if names.count(run.name) == 1 else f"{run.dir.parent.name}/{run.name}"
        template = own_template(rc.get("prompt_template"))
        same_format = template == rc.get("prompt_template")  # the run's own length and temperature fit only its format
        common = dict(
            run=name,
            prompt_template=template,
            max_new_tokens=new_tokens(template, rc.get("max_new_tokens") if same_format or not answer else None),
            temperature=temperature(rc.get("temperature")),
            started_from=(run.trained_on or {}).get("started_from"),
        )
        subjects.append(Subject(unique(f"{name}@0"), run.model, step=0, compute=0.0, **common))
        for step, folder, flops in run.checkpoints:
            if step == 0:
                continue
            subjects.append(Subject(unique(f"{name}@{step}"), str(folder), step=step, compute=flops, **common))
    return subjects


def predictions_key(subject: Subject, modes: Sequence[str]) -> tuple:
    """Subjects with equal keys make the same predictions (same weights, same generation settings)."""
    path = Path(subject.spec).expanduser()
    spec = str(path.resolve()) if path.exists() else subject.spec
    if "reasoning" not in modes and "answer" not in modes:
        return (spec,)
    return (spec, subject.prompt_template, subject.max_new_tokens, subject.temperature)


# ---------------------------------------------------------------------------------------------
# held-out check


def training_overlap(
    run: RunInfo, tasks_dir: Path, manifest: dict, split: str, doc_ids: set[str]
) -> tuple[set[str], str]:
    """The evaluated documents the run trained on (by its RUN/trained_on.json), and how that was decided.

    Raises MissingUpstream when it cannot be decided: the run has no record, or its tasks
    directory is gone or now holds other tasks."""
    record = run.trained_on
    if record is None:
        raise MissingUpstream(
            f"cannot check what run {run.dir} trained on: {run.dir / TRAINED_ON} is missing (the run was made "
            "before `rpt train` recorded it); pass --allow-overlap to evaluate anyway, or run `rpt train` on it "
            "once more with --resume, which writes the record"
        )
    run_tasks = run.tasks_dir
    same_dir = (run_tasks is not None and run_tasks == tasks_dir.resolve()) or (
        record.get("tasks_fingerprint") is not None and record["tasks_fingerprint"] == manifest.get("fingerprint")
    )
    if split == "eval":
        if same_dir:
            return set(), "same tasks directory; its eval split is held out from training"
        rule = recorded_split_rule(manifest)
        if rule is not None and rule == record.get("split_rule"):
            return set(), (
                f"same document split rule (seed {rule['seed']}, eval fraction {rule['eval_fraction']}); "
                "eval documents are never training documents"
            )
    if run_tasks is None or not (run_tasks / "manifest.json").exists():
        raise MissingUpstream(
            f"cannot check what run {run.dir} trained on: its tasks directory {record['tasks_dir']!r} "
            "is not there (moved?); pass --allow-overlap to evaluate anyway"
        )
    found = read_manifest(run_tasks).get("fingerprint")
    if record.get("tasks_fingerprint") not in (None, found):
        raise MissingUpstream(
            f"cannot check what run {run.dir} trained on: {run_tasks} now holds other tasks (fingerprint {found}, "
            f"the run trained on {record['tasks_fingerprint']}); pass --allow-overlap to evaluate anyway"
        )
    trained = {row["doc_id"] for row in iter_tasks(run_tasks, "train", columns=["doc_id"])}
    overlap = doc_ids & trained
    how = f"documents of the training split of {run_tasks}"
    rule = record.get("split_rule")
    if record.get("source") == "doc-windows" and rule is not None:
        # rpttrain.data.DocWindows: every document the tasks' rule puts in train, tasks or not
        overlap |= {d for d in doc_ids if split_of(d, rule["seed"], rule["eval_fraction"]) == "train"}
        how += " and every document its split rule puts in train (next-token training on whole documents)"
    return overlap, how


def check_runs(
    config: EvalConfig, runs: list[RunInfo], tasks_dir: Path, manifest: dict, tasks: list[dict], warnings: list[str]
) -> list[dict]:
    """The held-out check of every run: raises EvalOverlap (or, with allow_overlap, appends a
    warning); returns the report's `overlap` entries."""
    doc_ids = {t["doc_id"] for t in tasks}
    report = []
    for run in runs:
        if not run.checkpoints:
            warnings.append(f"{run.dir} has no complete checkpoint; only its base model (step 0) is evaluated")
        try:
            overlap, how = training_overlap(run, tasks_dir, manifest, config.split, doc_ids)
        except MissingUpstream as e:
            if not config.allow_overlap:
                raise
            warnings.append(f"WARNING: {e}")
            report.append({"run": str(run.dir), "documents": None, "how": "unchecked"})
            log.warning("%s", e)
            continue
        report.append({"run": str(run.dir), "documents": len(overlap), "how": how})
        if overlap:
            n_tasks = sum(t["doc_id"] in overlap for t in tasks)
            example = sorted(overlap)[:3]
            msg = (
                f"run {run.dir} trained on {len(overlap)} of the {len(doc_ids)} evaluated documents "
                f"({n_tasks} of {len(tasks)} tasks; e.g. {', '.join(example)}); checked against {how}"
            )
            if not config.allow_overlap:
                raise EvalOverlap(
                    f"{msg}. Its checkpoints' accuracy on them is not held-out accuracy. Evaluate the eval split "
                    "of the run's own tasks directory, or pass --allow-overlap to evaluate anyway."
                )
            warnings.append(f"WARNING (--allow-overlap): {msg}; these numbers are NOT held-out accuracy")
            log.warning("%s", warnings[-1])
    return report
