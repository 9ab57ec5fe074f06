"""`rpt eval`: next-token accuracy per entropy band, shaped like the paper's Table 1.

    from rpttrain.eval import EvalConfig, run_eval
    run_eval(EvalConfig(tasks_dir="out/tasks", models=("smollm2-135m",), out="out/eval")) -> report dict

What is evaluated ("subjects"): every `--model`, and for every `--checkpoints RUN_DIR` the run's
base model (step 0, compute 0) and each complete checkpoint in RUN/checkpoints/, with its
training compute `totals.flops` from the checkpoint's state.json. Subjects that would make the same
predictions (the same weights and settings, e.g. the base model of several runs) are evaluated
once and their rows copied. `rpt train` counts compute as
(rpttrain/train.py): 6·N FLOPs per token through the update (forward + backward) plus 2·N per
token the rollout engine runs through the model (`RolloutEngine.forward_tokens`), with N the
number of model parameters. See FLOPS_FORMULA.

Modes, both scored with the training reward (`rpttrain.reward`, prefix matching by default):
    ntp        the model reads the raw context (no prompt, no special tokens; its last
               `max_prompt_tokens` tokens), and its greedy next token, decoded to text, is the
               prediction. A batched forward pass (left-padded, logits_to_keep=1, argmax), not
               `generate`. Scoring decoded text against the continuation's bytes and token
               boundaries compares models with different tokenizers fairly, byte for byte. The
               same pass gives the model's own full-softmax next-token entropy (reported as the
               mean over the evaluated positions).
    reasoning  the training prompt (`--prompt-template`, default v0, or a run's own
               `prompt_template` for its checkpoints), generation through the rollout engine
               (`rpttrain.rollout`), the format's extraction, the reward. Greedy by default; with
               `samples` K > 1 the task's score is the mean reward of K samples at `temperature`,
               and Pass@K (unbiased estimator) is reported too.

Bands (paper Sec. 4.1): a task is in band easy / medium / hard when its entropy exceeds
0.5 / 1.0 / 1.5; bands are nested (hard inside medium inside easy), and the disjoint counts are
reported beside them. The entropy is the tasks' own `entropy` column, or with `band_model` the
top-k entropy of that model's next-token distribution at the position, from the raw context
(k and the entropy mode of the scorer that built the tasks, else 16 / full-softmax; the math is
`rptdata.scorers.entropy_from_logits`).

Accuracy cells carry the count and a 95% Wilson interval over tasks (with K samples a task
contributes its mean reward, so the count may be fractional).

Held-out data: the `eval` split by default. For each run, the evaluated documents are checked
against what the run recorded it trained on (RUN/trained_on.json: the `train` split of its tasks
directory, plus, for next-token runs over whole documents, every document its split rule puts in
`train`); an
overlap raises `EvalOverlap` unless `allow_overlap`, which evaluates anyway and records a
warning. The check is skipped as unnecessary when the split is `eval` and the run's tasks
directory is this one, or was split by the same rule (hash, seed, eval fraction).

Output (REPORT_DIR = `out`):
    run.json                       the settings predictions depend on (resume must match them)
    predictions/part-NNNNN.parquet rows written every `flush_every` tasks (atomic renames), so a
                                   crash loses at most one chunk; `resume` skips the
                                   (task, model, mode) triples already there
    predictions.parquet            all parts merged, at the end (PREDICTIONS_SCHEMA)
    band_entropy.parquet           with `band_model`: task_id, entropy (computed once)
    scaling.png                    with checkpoints: accuracy against compute, fitted curves
    report.md                      the table(s), the band counts, the scaling fits, a few examples
    report.json                    every number; written last
Scaling fits (`rpttrain.scaling`): per run, mode and band, P(C) = A / C^alpha + P* on the
checkpoints with C > 0; with no more points than parameters, or a fit on a parameter bound, the
report and the plot's legend say why there is no fit (`rpttrain.scaling.NoFit`) instead of numbers.

Modules (each a step of the stage; read in this order):
    config.py    EvalConfig, the modes
    stats.py     Wilson intervals, Pass@K, paired differences, band tables (pure)
    subjects.py  runs, checkpoints and subjects; the held-out check (EvalOverlap)
    store.py     REPORT_DIR's files: claiming it, the predictions store
    passes.py    the ntp and reasoning passes, the band entropy
    report.py    report.json's numbers: rows, paired differences, scaling fits
    examples.py  a few right and wrong predictions per band, drawn with the seed
    markdown.py  report.md and the printed tables
    run.py       run_eval: the order of the steps

Left out on purpose: vLLM for the ntp pass (a forward pass is all it needs).
"""

# what `from rpttrain.eval import NAME` gives, and the module it comes from: imported on first use, so
# that `rpttrain.eval.config` (EvalConfig, which `rpt eval --help` reads) loads without torch
_EXPORTS = {
    "FLOPS_FORMULA": "report",
    "MODES": "config",
    "PAIRED_LEGEND": "markdown",
    "PREDICTIONS_SCHEMA": "store",
    "EvalConfig": "config",
    "EvalOverlap": "subjects",
    "NextTokens": "passes",
    "RunInfo": "subjects",
    "band_table": "stats",
    "context_ids": "passes",
    "disjoint_counts": "stats",
    "format_band_counts": "markdown",
    "format_paired": "markdown",
    "format_report_md": "markdown",
    "format_scaling": "markdown",
    "format_answer_table": "markdown",
    "format_table": "markdown",
    "format_table2": "markdown",
    "next_token_pass": "passes",
    "pad_id": "passes",
    "paired_difference": "stats",
    "pass_at_k": "stats",
    "read_run": "subjects",
    "run_eval": "run",
    "training_overlap": "subjects",
    "wilson_interval": "stats",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
