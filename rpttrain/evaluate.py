"""`rpt eval`: next-token accuracy per entropy band, shaped like the paper's Table 1.

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
`rptdata.engines.entropy_from_logits`).

Accuracy cells carry the count and a 95% Wilson interval over tasks (with K samples a task
contributes its mean reward, so the count may be fractional).

Held-out data: the `eval` split by default. For each run, the evaluated documents are checked
against the documents the run trained on (the `train` split of the run's `tasks_dir`, plus, for
next-token runs over whole documents, every document its split rule puts in `train`); an
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
    report.md                      the table(s), the band counts, the scaling fits
    report.json                    every number; written last
Scaling fits (`rpttrain.scaling`): per run, mode and band, P(C) = A / C^alpha + P* on the
checkpoints with C > 0; with no more points than parameters, or a fit on a parameter bound, the
report and the plot's legend say why there is no fit (`rpttrain.scaling.NoFit`) instead of numbers.

Left out on purpose: vLLM for the ntp pass (a forward pass is all it needs), reusing one
model's rows for another label, and significance tests between rows (the intervals are there).
"""

from __future__ import annotations

import gc
import json
import logging
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rptdata.errors import MissingUpstream, RptError
from rptdata.manifest import (
    claim_run_dir,
    list_shards,
    read_manifest,
    shard_name,
    write_json_atomic,
    write_parquet_atomic,
)
from rpttrain.reward import REWARDS, get_reward_fn
from rptdata.bands import DEFAULT_BANDS, band_of, parse_bands
from rptdata.taskdef import SPLITS

log = logging.getLogger(__name__)

__all__ = [
    "MODES",
    "PREDICTIONS_SCHEMA",
    "EvalConfig",
    "EvalOverlap",
    "NextTokens",
    "band_table",
    "disjoint_counts",
    "format_scaling",
    "format_table",
    "next_token_pass",
    "pass_at_k",
    "plan_batches",
    "run_eval",
    "wilson_interval",
]

STAGE = "eval"
MODES = ("ntp", "reasoning")
MODE_CHOICES = ("ntp", "reasoning", "both")
PREDICTIONS_DIR = "predictions"
PREDICTIONS_FILE = "predictions.parquet"
BAND_ENTROPY_FILE = "band_entropy.parquet"
PLOT_FILE = "scaling.png"
OWN_NAMES = {"run.json", PREDICTIONS_DIR, PREDICTIONS_FILE, BAND_ENTROPY_FILE, PLOT_FILE, "report.md", "report.json"}
DEFAULT_REASONING_TOKENS = 256  # CPU-friendly; the paper allows 8,192
FLOPS_FORMULA = (
    "rpt train: 6*N FLOPs per token through the update's forward and backward + 2*N per token the rollout "
    "engine runs through the model (a prompt once per sample it is computed for: once for one-token rollouts "
    "and vLLM's shared prefill, n times for transformers generate; fed-back generated tokens), "
    "N = model parameters; next-token baselines: 6*N per trained token"
)

PREDICTIONS_SCHEMA = pa.schema(
    [
        ("task_id", pa.string()),
        ("model", pa.string()),  # the row label: a model name, or RUN@STEP for checkpoints
        ("mode", pa.string()),  # ntp | reasoning
        ("sample", pa.int32()),  # 0..K-1
        ("prediction", pa.string()),  # null when the format extracted nothing
        ("reward", pa.float64()),
        ("band", pa.string()),  # the highest band the task's entropy exceeds, or "other"
        ("entropy", pa.float32()),  # the entropy the band comes from
        ("model_entropy", pa.float32()),  # ntp: the model's full-softmax next-token entropy
        ("new_tokens", pa.int32()),  # tokens the model produced for this sample
    ]
)


class EvalOverlap(RptError):
    """A checkpoint's training run saw some of the evaluated documents."""


# ---------------------------------------------------------------------------------------------
# pure helpers


def wilson_interval(k: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials (95% for z = 1.96).

    k may be fractional (a mean reward summed over tasks). n = 0 gives (0.0, 1.0).

    >>> [round(x, 4) for x in wilson_interval(5, 10)]
    [0.2366, 0.7634]
    >>> [round(x, 4) for x in wilson_interval(0, 10)]
    [0.0, 0.2775]
    >>> [round(x, 4) for x in wilson_interval(10, 10)]
    [0.7225, 1.0]
    """
    if n <= 0:
        return 0.0, 1.0
    if not 0 <= k <= n:
        raise ValueError(f"successes must be between 0 and n={n}, not {k}")
    p = k / n
    denom = 1.0 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased Pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k)
    (Chen et al. 2021), computed as a stable product.

    >>> pass_at_k(8, 0, 8), pass_at_k(8, 1, 8), pass_at_k(8, 1, 1)
    (0.0, 1.0, 0.125)
    >>> round(pass_at_k(4, 2, 2), 4)   # 1 - C(2,2)/C(4,2) = 1 - 1/6
    0.8333
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n (got n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def paired_difference(a: Sequence[float], b: Sequence[float], z: float = 1.96) -> dict:
    """Accuracy of A minus accuracy of B on the same tasks, with a 95% interval and a p-value.

    Pairing matters: two models scored on the same 300 tasks differ far less than two independent
    Wilson intervals suggest. The interval is the normal one on the per-task differences; the
    p-value is the exact McNemar test (a sign test on the tasks only one model got right) when every
    score is 0 or 1, else a paired z test.

    >>> d = paired_difference([1, 1, 1, 0, 1, 0], [1, 0, 0, 0, 1, 0])
    >>> round(d["diff"], 4), d["wins"], d["losses"], d["p_value"]
    (0.3333, 2, 0, 0.5)
    """
    from scipy.stats import binomtest

    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"paired scores need the same tasks ({x.shape} vs {y.shape})")
    n = len(x)
    d = x - y
    out = {"n": n, "diff": float(d.mean()) if n else 0.0, "ci_low": None, "ci_high": None,
           "wins": int((d > 0).sum()), "losses": int((d < 0).sum()), "p_value": 1.0}
    if n > 1:
        half = z * float(d.std(ddof=1)) / math.sqrt(n)
        out["ci_low"], out["ci_high"] = out["diff"] - half, out["diff"] + half
    if np.isin(np.concatenate([x, y]), (0.0, 1.0)).all():
        discordant = out["wins"] + out["losses"]
        if discordant:
            out["p_value"] = float(binomtest(out["wins"], discordant, 0.5).pvalue)
    elif n > 1 and half > 0:
        out["p_value"] = float(math.erfc(abs(out["diff"]) / (half / z) / math.sqrt(2)))
    elif out["diff"] != 0:
        out["p_value"] = 0.0
    return out


def _band_items(bands) -> tuple[tuple[str, float], ...]:
    if isinstance(bands, str):
        return parse_bands(bands)
    items = bands.items() if isinstance(bands, Mapping) else bands
    return tuple((str(name), float(t)) for name, t in items)


def band_table(
    entropies: Sequence[float], scores: Sequence[float], bands=DEFAULT_BANDS, z: float = 1.96
) -> dict[str, dict]:
    """Accuracy per nested band, plus "all": {threshold, n, correct, accuracy, ci_low, ci_high}.

    A task is in band b when its entropy exceeds b's threshold (strictly, as `band_of`), so
    bands are nested. `scores` are per-task scores in [0, 1] (a 0/1 reward, or the mean of K
    samples); `correct` is their sum. An empty band has accuracy and interval None.

    >>> t = band_table([0.2, 0.7, 1.2, 1.8], [1, 0, 1, 1])
    >>> t["easy"]["n"], t["easy"]["correct"], t["medium"]["n"], t["hard"]["accuracy"]
    (3, 2.0, 2, 1.0)
    >>> t["all"]["n"], round(t["all"]["accuracy"], 2)
    (4, 0.75)
    >>> band_table([0.1], [1.0])["hard"]["accuracy"] is None
    True
    """
    h = np.asarray(entropies, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64)
    if h.shape != s.shape:
        raise ValueError(f"one entropy per score: got {h.shape} and {s.shape}")
    out: dict[str, dict] = {}
    for name, threshold in [*_band_items(bands), ("all", None)]:
        mask = np.ones(len(h), bool) if threshold is None else h > threshold
        n = int(mask.sum())
        correct = float(s[mask].sum())
        lo, hi = wilson_interval(min(correct, n), n, z) if n else (None, None)
        out[name] = {
            "threshold": threshold, "n": n, "correct": correct,
            "accuracy": correct / n if n else None, "ci_low": lo, "ci_high": hi,
        }
    return out


def disjoint_counts(entropies: Sequence[float], bands=DEFAULT_BANDS) -> dict[str, int]:
    """Tasks per disjoint band (each counted once, in its highest band; "other" below all).

    >>> disjoint_counts([0.2, 0.7, 0.9, 1.2, 1.8])
    {'other': 1, 'easy': 2, 'medium': 1, 'hard': 1}
    """
    items = _band_items(bands)
    counts = {"other": 0, **{name: 0 for name, _ in items}}
    for e in entropies:
        counts[band_of(float(e), items)] += 1
    return counts


def plan_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Batches of at most `batch_size` indices, longest sequences first (little padding).

    Ties keep their input order, so the plan is deterministic.

    >>> plan_batches([3, 10, 4, 9, 1], batch_size=2)
    [[1, 3], [2, 0], [4]]
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


# ---------------------------------------------------------------------------------------------
# config


@dataclass(frozen=True)
class EvalConfig:
    """Options of `rpt eval`.

    Fields:
        tasks_dir: a finished `rpt make-tasks` directory.
        models: model specs to evaluate (hub id, folder, .gguf, alias).
        checkpoints: `rpt train` run directories; each gives its base model (step 0) and every
            complete checkpoint.
        max_compute: leave out checkpoints that spent more training FLOPs than this, so runs
            of different objectives are compared at (at most) equal compute.
        mode: ntp | reasoning | both.
        samples: K samples per task in reasoning mode (1 = greedy).
        temperature: reasoning sampling temperature; None: 0 (greedy) when samples == 1, else
            the run's training temperature for checkpoints and 0.8 (the paper's) for models.
        max_new_tokens: reasoning completion budget; None: a run's own for its checkpoints, else
            1 for raw formats (continuation) and 256 for chat formats.
        max_prompt_tokens: the longest prompt (ntp: the last tokens of the context).
        prompt_template: reasoning format for every subject; None: v0, or a run's own.
        bands: (name, threshold) pairs, or "0.5,1.0,1.5".
        band_model: recompute the band entropy with this model (None: the tasks' column).
        out: REPORT_DIR; None writes into a temporary folder that is removed afterwards.
        engine: reasoning rollout engine: auto | hf | vllm.
        limit: evaluate the first N tasks of the split (None: all).
        split: eval (held out, default) or train.
        allow_overlap: evaluate even when a run trained on evaluated documents (warns).
        resume: continue an evaluation in `out`, skipping (task, model, mode) rows already done.
        overwrite: replace an evaluation in `out`.
        batch_size: sequences per forward pass (ntp) or per generate call (reasoning).
        flush_every: tasks per predictions part (the most a crash can lose).
        reward: reward rule from `rpttrain.reward.REWARDS` (prefix: the paper's Eq. 3).
        seed: sampling seed (reasoning with temperature > 0).
        device, dtype, trust_remote_code, progress: as in the other stages.
    """

    tasks_dir: str
    models: tuple[str, ...] = ()
    checkpoints: tuple[str, ...] = ()
    max_compute: float | None = None
    mode: str = "ntp"
    samples: int = 1
    temperature: float | None = None
    max_new_tokens: int | None = None
    max_prompt_tokens: int = 4096
    prompt_template: str | None = None
    bands: tuple[tuple[str, float], ...] = DEFAULT_BANDS
    band_model: str | None = None
    out: str | None = None
    engine: str = "auto"
    limit: int | None = None
    split: str = "eval"
    allow_overlap: bool = False
    resume: bool = False
    overwrite: bool = False
    batch_size: int = 16
    flush_every: int = 128
    reward: str = "prefix"
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    trust_remote_code: bool = False
    progress: bool = True

    def __post_init__(self):
        object.__setattr__(self, "models", tuple(self.models))
        object.__setattr__(self, "checkpoints", tuple(self.checkpoints))
        object.__setattr__(self, "bands", _band_items(self.bands))
        if not self.models and not self.checkpoints:
            raise ValueError("nothing to evaluate: give at least one --model or --checkpoints RUN_DIR")
        if self.mode not in MODE_CHOICES:
            raise ValueError(f"--mode must be one of {', '.join(MODE_CHOICES)}, not {self.mode!r}")
        if self.split not in SPLITS:
            raise ValueError(f"--split must be one of {', '.join(SPLITS)}, not {self.split!r}")
        if self.samples < 1:
            raise ValueError("--samples must be at least 1")
        if self.temperature is not None and (not math.isfinite(self.temperature) or self.temperature < 0):
            raise ValueError(f"--temperature must be >= 0, not {self.temperature}")
        if self.samples > 1 and self.temperature == 0:
            raise ValueError(
                f"--samples {self.samples} at temperature 0 would repeat one greedy answer {self.samples} times; "
                "give --temperature > 0 (the paper samples at 0.8) or --samples 1"
            )
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError("--max-new-tokens must be at least 1")
        if self.max_prompt_tokens < 1:
            raise ValueError("--max-prompt-tokens must be at least 1")
        if self.batch_size < 1 or self.flush_every < 1:
            raise ValueError("--batch-size and --flush-every must be at least 1")
        if self.max_compute is not None and not (math.isfinite(self.max_compute) and self.max_compute > 0):
            raise ValueError(f"--max-compute must be a positive number of FLOPs, not {self.max_compute}")
        if self.limit is not None and self.limit < 1:
            raise ValueError("--limit must be at least 1 (leave it out to evaluate every task)")
        if self.engine not in ("auto", "hf", "vllm"):
            raise ValueError(f"--engine must be auto, hf or vllm, not {self.engine!r}")
        if self.reward not in REWARDS:
            raise ValueError(f"--reward must be one of {', '.join(REWARDS)}, not {self.reward!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError("--dtype must be auto, float32, bfloat16 or float16")
        if not self.bands or any(not math.isfinite(t) for _, t in self.bands):
            raise ValueError("--bands needs finite thresholds, e.g. 0.5,1.0,1.5")
        if len({name for name, _ in self.bands}) != len(self.bands) or "all" in dict(self.bands):
            raise ValueError("--bands names must be distinct and not 'all'")
        if self.resume and self.overwrite:
            raise ValueError("--resume continues an evaluation and --overwrite replaces it; give one of them")
        if self.resume and self.out is None:
            raise ValueError("--resume needs --out: the predictions to resume live there")
        if self.prompt_template is not None:
            from rpttrain.prompts import load_prompt_format

            load_prompt_format(self.prompt_template)  # an unknown name fails before any model loads

    @property
    def modes(self) -> tuple[str, ...]:
        return MODES if self.mode == "both" else (self.mode,)

    def identity(self, tasks_fingerprint: str | None) -> dict:
        """The settings the stored predictions depend on; a resumed evaluation must match them.
        Models, modes and --limit may change between runs (new rows are added)."""
        keys = ("split", "samples", "temperature", "max_new_tokens", "max_prompt_tokens", "prompt_template",
                "band_model", "reward", "seed", "dtype")
        d = {k: getattr(self, k) for k in keys}
        d["bands"] = [list(b) for b in self.bands]
        d["tasks"] = tasks_fingerprint
        return d


# ---------------------------------------------------------------------------------------------
# what to evaluate: models, runs and their checkpoints


@dataclass(frozen=True)
class RunInfo:
    """A `rpt train` run directory, as eval needs it."""

    name: str
    dir: Path
    config: dict
    model: str  # the base model spec (resolved path when it is a local one)
    tasks_dir: Path | None  # None when it is not there any more
    checkpoints: tuple[tuple[int, Path, float], ...]  # (step, folder, training FLOPs), oldest first


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


def _local_path(value: str, run_dir: Path) -> Path | None:
    """A path named in a run's config.yaml: as given, else relative to the run or its parent."""
    p = Path(value).expanduser()
    for candidate in (p, run_dir / p, run_dir.parent / p):
        if candidate.exists():
            return candidate.resolve()
    return None


def read_run(run_dir: str | Path) -> RunInfo:
    """Read a run's config.yaml and its complete checkpoints (step, folder, totals.flops)."""
    import yaml

    from rpttrain.checkpoint import list_checkpoints

    root = Path(run_dir).resolve()
    cfg_path = root / "config.yaml"
    if not cfg_path.exists():
        raise MissingUpstream(f"{run_dir}: no config.yaml; not an `rpt train` run directory")
    config = yaml.safe_load(cfg_path.read_text()) or {}
    for key in ("model", "tasks_dir"):
        if key not in config:
            raise MissingUpstream(f"{cfg_path} has no {key!r}; not an `rpt train` config")
    model_path = _local_path(str(config["model"]), root)
    checkpoints = []
    for folder in list_checkpoints(root):
        state = json.loads((folder / "state.json").read_text())
        flops = float((state.get("totals") or {}).get("flops", float("nan")))
        checkpoints.append((int(state.get("step", folder.name.split("-")[-1])), folder, flops))
    return RunInfo(
        name=root.name, dir=root, config=config, model=str(model_path) if model_path else str(config["model"]),
        tasks_dir=_local_path(str(config["tasks_dir"]), root), checkpoints=tuple(checkpoints),
    )


def _within_budget(run: RunInfo, max_compute: float) -> RunInfo:
    """The run with only the checkpoints that spent at most `max_compute` training FLOPs."""
    kept = tuple(c for c in run.checkpoints if c[2] <= max_compute)
    if len(kept) < len(run.checkpoints):
        log.info("%s: %d checkpoint(s) over --max-compute %.3g left out", run.dir, len(run.checkpoints) - len(kept),
                 max_compute)
    return replace(run, checkpoints=kept)


def _resolve_subjects(config: EvalConfig, runs: list[RunInfo]) -> list[Subject]:
    from rptdata.models import model_name
    from rpttrain.prompts import load_prompt_format

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

    for spec in config.models:
        template = config.prompt_template or "v0"
        subjects.append(Subject(unique(model_name(spec)), spec, prompt_template=template,
                                max_new_tokens=new_tokens(template, None), temperature=temperature(None)))
    names = [r.name for r in runs]
    for run in runs:
        rc = run.config
        name = run.name if names.count(run.name) == 1 else f"{run.dir.parent.name}/{run.name}"
        template = config.prompt_template or rc.get("prompt_template") or "v0"
        common = dict(run=name, prompt_template=template, max_new_tokens=new_tokens(template, rc.get("max_new_tokens")),
                      temperature=temperature(rc.get("temperature")))
        subjects.append(Subject(unique(f"{name}@0"), run.model, step=0, compute=0.0, **common))
        for step, folder, flops in run.checkpoints:
            if step == 0:
                continue
            subjects.append(Subject(unique(f"{name}@{step}"), str(folder), step=step, compute=flops, **common))
    return subjects


# ---------------------------------------------------------------------------------------------
# held-out check


def _split_rule(manifest: dict | None) -> dict | None:
    split = (manifest or {}).get("split") or {}
    rule = {k: split.get(k) for k in ("hash", "seed", "eval_fraction")}
    return rule if all(v is not None for v in rule.values()) else None


def training_overlap(run: RunInfo, tasks_dir: Path, manifest: dict, split: str, doc_ids: set[str]) -> tuple[set[str], str]:
    """The evaluated documents the run trained on, and how that was decided.

    Raises MissingUpstream when it cannot be decided (the run's tasks directory is gone)."""
    from rptdata.taskdef import split_of
    from rpttrain.data import iter_tasks

    run_tasks = run.tasks_dir
    run_manifest = None
    if run_tasks is not None and (run_tasks / "manifest.json").exists():
        run_manifest = read_manifest(run_tasks)
    same_dir = run_tasks is not None and (
        run_tasks == tasks_dir.resolve()
        or (run_manifest is not None and run_manifest.get("fingerprint") == manifest.get("fingerprint"))
    )
    if split == "eval":
        if same_dir:
            return set(), "same tasks directory; its eval split is held out from training"
        rule = _split_rule(manifest)
        if rule is not None and rule == _split_rule(run_manifest):
            return set(), f"same document split rule ({rule}); eval documents are never training documents"
    if run_manifest is None:
        raise MissingUpstream(
            f"cannot check what run {run.dir} trained on: its tasks directory {run.config.get('tasks_dir')!r} "
            "is not there (moved?); pass --allow-overlap to evaluate anyway"
        )
    trained = {row["doc_id"] for row in iter_tasks(run_tasks, "train", columns=["doc_id"])}
    overlap = doc_ids & trained
    how = f"documents of the training split of {run_tasks}"
    rc = run.config
    run_split = run_manifest.get("split") or {}
    if rc.get("objective", "rpt") != "rpt" and rc.get("ntp_positions", "all") == "all" and \
            run_split.get("seed") is not None and run_split.get("eval_fraction") is not None:
        # rpttrain.data.DocWindows: every document the tasks' rule puts in train, tasks or not
        seed, fraction = run_split["seed"], run_split["eval_fraction"]
        overlap |= {d for d in doc_ids if split_of(d, seed, fraction) == "train"}
        how += " and every document its split rule puts in train (next-token training on whole documents)"
    return overlap, how


# ---------------------------------------------------------------------------------------------
# model passes


@dataclass
class NextTokens:
    """Per context: the greedy next token, the full-softmax entropy, the top-k entropy (if asked)."""

    ids: list[int]
    entropy: list[float]
    topk_entropy: list[float] | None = None


def next_token_pass(model, id_lists: Sequence[Sequence[int]], batch_size: int, pad_id: int,
                    top_k: int | None = None, entropy_mode: str = "full-softmax") -> NextTokens:
    """One forward pass per batch of contexts (left-padded, only the last position through the
    LM head); returns the argmax next token and entropies of each context, in input order."""
    import torch

    from rpttrain.rollout.hf import left_pad

    n = len(id_lists)
    out = NextTokens([0] * n, [0.0] * n, [0.0] * n if top_k else None)
    device = next(model.parameters()).device
    with torch.no_grad():
        for batch in plan_batches([len(x) for x in id_lists], batch_size):
            ids, attn, pos = left_pad([id_lists[i] for i in batch], pad_id)
            logits = model(input_ids=ids.to(device), attention_mask=attn.to(device), position_ids=pos.to(device),
                           logits_to_keep=1).logits[:, -1].float()
            top1 = logits.argmax(-1).tolist()
            logp = torch.log_softmax(logits, dim=-1)
            ent = torch.special.entr(logp.exp()).sum(-1).tolist()
            if top_k:
                from rptdata.scorers import entropy_from_logits

                topk = entropy_from_logits(logits, k=top_k, mode=entropy_mode).tolist()
            for row, i in enumerate(batch):
                out.ids[i] = int(top1[row])
                out.entropy[i] = float(ent[row])
                if top_k:
                    out.topk_entropy[i] = float(topk[row])
    return out


def context_ids(tokenizer, contexts: Sequence[str], max_tokens: int) -> list[list[int]]:
    """Raw contexts as token ids (no special tokens), keeping the last `max_tokens`; an empty
    context becomes the BOS (or EOS) token so the model has something to read."""
    enc = tokenizer(list(contexts), add_special_tokens=False)["input_ids"]
    fallback = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    out = []
    for ids in enc:
        ids = list(ids[len(ids) - max_tokens :]) if len(ids) > max_tokens else list(ids)
        out.append(ids or [int(fallback or 0)])
    return out


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return int(pad if pad is not None else 0)


def _max_positions(model, wanted: int) -> int:
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return min(wanted, int(limit)) if limit else wanted


# ---------------------------------------------------------------------------------------------
# the predictions store


class _Store:
    """REPORT_DIR/predictions/part-NNNNN.parquet, one per flushed chunk."""

    def __init__(self, root: Path):
        self.dir = root / PREDICTIONS_DIR
        self.parts = list_shards(self.dir)
        self.next = 1 + max((int(p.stem.rsplit("-", 1)[1]) for p in self.parts), default=-1)

    def done(self) -> set[tuple[str, str, str]]:
        keys: set[tuple[str, str, str]] = set()
        for path in self.parts:
            t = pq.read_table(path, columns=["task_id", "model", "mode"])
            keys.update(zip(*(t.column(c).to_pylist() for c in ("task_id", "model", "mode"))))
        return keys

    def write(self, rows: dict[str, list]) -> None:
        path = self.dir / shard_name(self.next)
        write_parquet_atomic(pa.Table.from_pydict(rows, schema=PREDICTIONS_SCHEMA), path)
        self.parts.append(path)
        self.next += 1

    def table(self) -> pa.Table:
        if not self.parts:
            return PREDICTIONS_SCHEMA.empty_table()
        return pa.concat_tables([pq.read_table(p, schema=PREDICTIONS_SCHEMA) for p in self.parts])


def _empty_rows() -> dict[str, list]:
    return {f.name: [] for f in PREDICTIONS_SCHEMA}


# ---------------------------------------------------------------------------------------------
# the stage


@dataclass
class _Ctx:
    """What every chunk needs (built once per evaluation)."""

    config: EvalConfig
    tasks: list[dict]
    entropy: list[float]
    bands: list[str]
    store: _Store
    reward_fn: object
    timings: dict = field(default_factory=dict)  # (label, mode) -> [seconds, tasks]


def _prepare_out(config: EvalConfig, out: Path, identity: dict) -> None:
    """Claim `out` for this evaluation: a rerun needs --resume (same settings) or --overwrite."""
    claim_run_dir(out, STAGE, identity, OWN_NAMES, overwrite=config.overwrite, resume=config.resume,
                  progress=(f"{PREDICTIONS_DIR}/*",))
    out.mkdir(parents=True, exist_ok=True)


def _band_entropies(config: EvalConfig, out: Path, tasks: list[dict], manifest: dict) -> tuple[list[float], dict]:
    """The entropy each task's band comes from, and a description of its source."""
    if config.band_model is None:
        proxy = manifest.get("proxy") or {}
        return [float("nan") if t["entropy"] is None else float(t["entropy"]) for t in tasks], {
            "source": "tasks", "proxy": proxy.get("name") or proxy.get("spec")}
    top_k, mode = 16, "full-softmax"
    try:  # use the definition of the scorer that built these tasks
        options = read_manifest(Path(manifest["scored_dir"])).get("options") or {}
        top_k, mode = int(options.get("top_k", top_k)), str(options.get("entropy", mode))
    except (KeyError, TypeError, ValueError, MissingUpstream):
        pass
    cache_path = out / BAND_ENTROPY_FILE
    cached: dict[str, float] = {}
    if cache_path.exists():
        t = pq.read_table(cache_path)
        cached = dict(zip(t.column("task_id").to_pylist(), t.column("entropy").to_pylist()))
    missing = [i for i, t in enumerate(tasks) if t["task_id"] not in cached]
    if missing:
        from rptdata.models import load_causal_lm, load_tokenizer, resolve_device

        device = resolve_device(config.device)
        tok = load_tokenizer(config.band_model, trust_remote_code=config.trust_remote_code)
        model = load_causal_lm(config.band_model, dtype=config.dtype, device=device, trust_remote_code=config.trust_remote_code)
        ids = context_ids(tok, [tasks[i]["context"] for i in missing], _max_positions(model, config.max_prompt_tokens))
        log.info("band entropy: %d contexts through %s", len(ids), config.band_model)
        res = next_token_pass(model, ids, config.batch_size, _pad_id(tok), top_k=top_k, entropy_mode=mode)
        for i, h in zip(missing, res.topk_entropy):
            cached[tasks[i]["task_id"]] = h
        write_parquet_atomic(pa.table({"task_id": list(cached), "entropy": pa.array(list(cached.values()), pa.float32())}),
                             cache_path)
        del model
        gc.collect()
    return [float(cached[t["task_id"]]) for t in tasks], {
        "source": "band_model", "model": config.band_model, "top_k": top_k, "mode": mode}


def _ntp_chunk(ctx: _Ctx, subject: Subject, model, tok, idx: list[int]) -> dict[str, list]:
    c = ctx.config
    ids = context_ids(tok, [ctx.tasks[i]["context"] for i in idx], _max_positions(model, c.max_prompt_tokens))
    res = next_token_pass(model, ids, c.batch_size, _pad_id(tok))
    rows = _empty_rows()
    for j, i in enumerate(idx):
        task = ctx.tasks[i]
        pred = tok.decode([res.ids[j]])
        rows["task_id"].append(task["task_id"])
        rows["model"].append(subject.label)
        rows["mode"].append("ntp")
        rows["sample"].append(0)
        rows["prediction"].append(pred)
        rows["reward"].append(float(ctx.reward_fn(pred, task["continuation"], task["boundaries"])))
        rows["band"].append(ctx.bands[i])
        rows["entropy"].append(ctx.entropy[i])
        rows["model_entropy"].append(res.entropy[j])
        rows["new_tokens"].append(1)
    return rows


def _reasoning_chunk(ctx: _Ctx, subject: Subject, engine, tok, fmt, idx: list[int]) -> dict[str, list]:
    from rpttrain.prompts import build_prompt_ids
    from rpttrain.rollout import Sampling, stop_ids

    c = ctx.config
    prompts = [build_prompt_ids(fmt, ctx.tasks[i]["context"], tok, c.max_prompt_tokens) for i in idx]
    sampling = Sampling(n=c.samples, temperature=subject.temperature, max_new_tokens=subject.max_new_tokens,
                        seed=c.seed + idx[0], stop_token_ids=stop_ids(tok))
    groups = engine.generate(prompts, sampling)
    rows = _empty_rows()
    for i, group in zip(idx, groups):
        task = ctx.tasks[i]
        for s, comp in enumerate(group):
            pred = fmt.extract(comp.text)
            rows["task_id"].append(task["task_id"])
            rows["model"].append(subject.label)
            rows["mode"].append("reasoning")
            rows["sample"].append(s)
            rows["prediction"].append(pred)
            rows["reward"].append(float(ctx.reward_fn(pred, task["continuation"], task["boundaries"])))
            rows["band"].append(ctx.bands[i])
            rows["entropy"].append(ctx.entropy[i])
            rows["model_entropy"].append(None)
            rows["new_tokens"].append(len(comp.token_ids))
    return rows


def _evaluate_subject(ctx: _Ctx, subject: Subject, todo: dict[str, list[int]], device: str) -> dict:
    """Run the missing (task, mode) rows of one subject; returns facts about it for the report."""
    from tqdm import tqdm

    from rptdata.models import load_causal_lm, load_tokenizer, vocab_hash

    c = ctx.config
    tok = load_tokenizer(subject.spec, trust_remote_code=c.trust_remote_code)
    info = {"vocab_hash": vocab_hash(tok)}
    if not any(todo.values()):
        return info
    model = load_causal_lm(subject.spec, dtype=c.dtype, device=device, trust_remote_code=c.trust_remote_code)
    info["parameters"] = sum(p.numel() for p in model.parameters())
    engine = None
    try:
        for mode in MODES:
            idx = todo.get(mode) or []
            if not idx:
                continue
            fmt = None
            if mode == "reasoning":
                from rpttrain.prompts import load_prompt_format
                from rptdata.engine_choice import choose_engine as pick_engine
                from rpttrain.rollout import make_engine

                fmt = load_prompt_format(subject.prompt_template)
                name = pick_engine(c.engine, device)
                kwargs = {"max_batch_sequences": c.batch_size} if name == "hf" else {
                    "model_path": _vllm_path(subject.spec), "seed": c.seed, "dtype": c.dtype}
                engine = make_engine(name, model, tok, **kwargs)
            started = time.perf_counter()
            bar = tqdm(total=len(idx), desc=f"eval {subject.label} {mode}", unit=" task", disable=not c.progress,
                       dynamic_ncols=True)
            for start in range(0, len(idx), c.flush_every):
                chunk = idx[start : start + c.flush_every]
                if mode == "ntp":
                    rows = _ntp_chunk(ctx, subject, model, tok, chunk)
                else:
                    rows = _reasoning_chunk(ctx, subject, engine, tok, fmt, chunk)
                ctx.store.write(rows)
                bar.update(len(chunk))
            bar.close()
            ctx.timings[(subject.label, mode)] = [time.perf_counter() - started, len(idx)]
    finally:
        if engine is not None:
            engine.close()
        del model
        gc.collect()
    return info


def _predictions_key(subject: Subject, modes: Sequence[str]) -> tuple:
    """Subjects with equal keys make the same predictions (same weights, same generation settings)."""
    path = Path(subject.spec).expanduser()
    spec = str(path.resolve()) if path.exists() else subject.spec
    if "reasoning" not in modes:
        return (spec,)
    return (spec, subject.prompt_template, subject.max_new_tokens, subject.temperature)


def _copy_rows(ctx: _Ctx, source: str, label: str, todo: dict[str, list[int]]) -> None:
    """Give `label` the stored predictions of `source` for the (task, mode) rows it still lacks."""
    wanted = {(ctx.tasks[i]["task_id"], mode) for mode, idx in todo.items() for i in idx}
    if not wanted:
        return
    table = ctx.store.table()
    rows = _empty_rows()
    for r in table.filter(pc.equal(table.column("model"), source)).to_pylist():
        if (r["task_id"], r["mode"]) in wanted:
            r["model"] = label
            for name, values in rows.items():
                values.append(r[name])
    ctx.store.write(rows)


def _vllm_path(spec: str) -> str:
    from rptdata.models import local_model_dir

    return spec if Path(spec).is_dir() else local_model_dir(spec)


def run_eval(config: EvalConfig) -> dict:
    """Evaluate every subject in every mode on the tasks; write REPORT_DIR; return the report."""
    started = time.time()
    tasks_dir = Path(config.tasks_dir)
    manifest = read_manifest(tasks_dir, "make-tasks")
    from rpttrain.data import load_tasks

    tasks = load_tasks(tasks_dir, config.split, limit=config.limit)
    if not tasks:
        raise RptError(f"{tasks_dir}: the {config.split} split holds no tasks")
    runs = [read_run(r) for r in config.checkpoints]
    if config.max_compute is not None:
        runs = [_within_budget(r, config.max_compute) for r in runs]
    warnings: list[str] = []
    overlap_report = _check_runs(config, runs, tasks_dir, manifest, tasks, warnings)
    subjects = _resolve_subjects(config, runs)

    tmp = None
    if config.out is None:
        tmp = tempfile.mkdtemp(prefix="rpt-eval-")
    out = Path(config.out or tmp)
    try:
        _prepare_out(config, out, config.identity(manifest.get("fingerprint")))
        entropy, entropy_source = _band_entropies(config, out, tasks, manifest)
        ctx = _Ctx(config, tasks, entropy, [band_of(h, config.bands) for h in entropy], _Store(out),
                   get_reward_fn(config.reward))
        done = ctx.store.done() if config.resume else set()
        if done:
            log.info("resuming: %d (task, model, mode) rows already in %s", len(done), out / PREDICTIONS_DIR)
        from rptdata.models import resolve_device

        device = resolve_device(config.device)
        infos = {}
        first_with: dict[tuple, str] = {}  # what a subject's predictions depend on -> first subject with it
        for subject in subjects:
            todo = {mode: [i for i, t in enumerate(tasks) if (t["task_id"], subject.label, mode) not in done]
                    for mode in config.modes}
            twin = first_with.setdefault(_predictions_key(subject, config.modes), subject.label)
            if twin != subject.label:  # e.g. the shared base model (step 0) of several runs: evaluated once
                infos[subject.label] = infos[twin]
                _copy_rows(ctx, twin, subject.label, todo)
                continue
            infos[subject.label] = _evaluate_subject(ctx, subject, todo, device)
        table = ctx.store.table()
        write_parquet_atomic(table, out / PREDICTIONS_FILE)
        report = _build_report(config, ctx, manifest, subjects, runs, infos, table, entropy_source,
                               overlap_report, warnings)
        if runs and config.out is not None:
            from rpttrain.scaling import plot_scaling

            plot = out / PLOT_FILE
            plot_scaling(report, plot)
            report["files"]["plot"] = str(plot)
        report["seconds"] = round(time.time() - started, 2)
        (out / "report.md").write_text(format_report_md(report))
        write_json_atomic(out / "report.json", report)  # last: its existence proves the evaluation finished
        return report
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _check_runs(config: EvalConfig, runs: list[RunInfo], tasks_dir: Path, manifest: dict, tasks: list[dict],
                warnings: list[str]) -> list[dict]:
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
            msg = (f"run {run.dir} trained on {len(overlap)} of the {len(doc_ids)} evaluated documents "
                   f"({n_tasks} of {len(tasks)} tasks; e.g. {', '.join(example)}); checked against {how}")
            if not config.allow_overlap:
                raise EvalOverlap(
                    f"{msg}. Its checkpoints' accuracy on them is not held-out accuracy. Evaluate the eval split "
                    "of the run's own tasks directory, or pass --allow-overlap to evaluate anyway."
                )
            warnings.append(f"WARNING (--allow-overlap): {msg}; these numbers are NOT held-out accuracy")
            log.warning("%s", warnings[-1])
    return report


# ---------------------------------------------------------------------------------------------
# the report


def _aggregate(table: pa.Table, label: str, mode: str, task_index: dict[str, int]) -> dict | None:
    """Per task (in task order): mean reward, samples, correct samples, model entropy."""
    import pyarrow.compute as pc

    t = table.filter(pc.and_(pc.equal(table["model"], label), pc.equal(table["mode"], mode)))
    if t.num_rows == 0:
        return None
    n = len(task_index)
    total = np.zeros(n)
    count = np.zeros(n, dtype=np.int64)
    correct = np.zeros(n, dtype=np.int64)
    ment = np.full(n, np.nan)
    for tid, r, me in zip(t.column("task_id").to_pylist(), t.column("reward").to_pylist(),
                          t.column("model_entropy").to_pylist()):
        i = task_index.get(tid)
        if i is None:  # a task outside this evaluation (another --limit)
            continue
        total[i] += r
        count[i] += 1
        correct[i] += r > 0
        if me is not None:
            ment[i] = me
    seen = count > 0
    return {"mean": np.where(seen, total / np.maximum(count, 1), 0.0), "count": count, "correct": correct,
            "seen": seen, "model_entropy": ment}


def _build_report(config, ctx: _Ctx, manifest, subjects, runs, infos, table, entropy_source, overlap, warnings) -> dict:
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
                "model": subject.label, "spec": subject.spec, "run": subject.run, "step": subject.step,
                "compute": subject.compute, "mode": mode, "tasks": len(ctx.tasks),
                "samples": k, "bands": band_table(entropy, agg["mean"], config.bands),
                "model_entropy": None,
                "same_tokenizer_as_tasks": infos[subject.label]["vocab_hash"] == tasks_hash if tasks_hash else None,
            }
            if mode == "reasoning":
                row.update(prompt_template=subject.prompt_template, temperature=subject.temperature,
                           max_new_tokens=subject.max_new_tokens)
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
            "modes": list(config.modes), "samples": config.samples, "temperature": config.temperature,
            "max_new_tokens": config.max_new_tokens, "max_prompt_tokens": config.max_prompt_tokens,
            "prompt_template": config.prompt_template, "reward": config.reward, "seed": config.seed,
            "engine": config.engine, "dtype": config.dtype, "device": config.device, "batch_size": config.batch_size,
            "limit": config.limit, "resume": config.resume, "max_compute": config.max_compute,
        },
        "overlap": overlap,
        "warnings": warnings,
        "rows": rows,
        "compute_formula": FLOPS_FORMULA if runs else None,
        "scaling": _scaling_fits(config, rows, runs),
        "paired": paired,
        "files": {
            "report_md": str(out / "report.md") if config.out else None,
            "report_json": str(out / "report.json") if config.out else None,
            "predictions": str(out / PREDICTIONS_FILE) if config.out else None,
            "predictions_parts": str(out / PREDICTIONS_DIR) if config.out else None,
        },
    }
    return report


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
        key = _predictions_key(s, modes)
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


def _scaling_fits(config: EvalConfig, rows: list[dict], runs: list[RunInfo]) -> list[dict]:
    from rpttrain.scaling import MIN_POINTS, fit_scaling

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
                pts = [(r["compute"], r["bands"][band]["accuracy"]) for r in mine
                       if r["compute"] is not None and r["compute"] > 0 and r["bands"][band]["accuracy"] is not None]
                fit = {"run": run, "mode": mode, "band": band, "points": len(pts),
                       "A": None, "alpha": None, "p_star": None, "r2": None}
                if len(pts) < MIN_POINTS:
                    fit["status"] = f"no fit: {len(pts)} points with compute > 0 for 3 parameters (need {MIN_POINTS})"
                elif len({p[1] for p in pts}) == 1:  # R² is undefined and alpha arbitrary on a flat line
                    fit.update(A=0.0, p_star=pts[0][1], status=f"flat: every point at {100 * pts[0][1]:.2f}%")
                else:
                    try:
                        a, alpha, p_star, r2 = fit_scaling([p[0] for p in pts], [p[1] for p in pts])
                        fit.update(A=a, alpha=alpha, p_star=p_star, r2=r2, status="ok")
                    except (RuntimeError, ValueError) as e:  # NoFit is a ValueError: the reason
                        fit["status"] = f"no fit: {e}"
                fits.append(fit)
    return fits


def _pct(x: float | None, digits: int = 2) -> str:
    return "—" if x is None else f"{100 * x:.{digits}f}"


def _cell(stats: dict) -> str:
    if not stats["n"]:
        return "— (0)"
    return (f"{_pct(stats['accuracy'])} ({stats['correct']:g}/{stats['n']}; "
            f"{_pct(stats['ci_low'], 1)}–{_pct(stats['ci_high'], 1)})")


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
        cells.append(r["mode"] if r["mode"] == "ntp" or r["samples"] == 1 else f"{r['mode']} (mean of {r['samples']})")
        cells += [_cell(r["bands"][name]) for name, _ in bands] + [_cell(r["bands"]["all"])]
        if with_pass:
            cells.append(_pct((r.get("pass_at_k") or {}).get("all")) if r.get("pass_at_k") else "—")
        cells.append("—" if r["model_entropy"] is None else f"{r['model_entropy']:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_band_counts(report: dict) -> str:
    nested = report["band_counts"]["nested"]
    disjoint = report["band_counts"]["disjoint"]
    names = list(report["bands"])
    src = report["band_entropy"]
    source = (f"the band model {src['model']} (top-{src['top_k']}, {src['mode']})" if src["source"] == "band_model"
              else f"the tasks' entropy column (proxy: {src.get('proxy') or 'unknown'})")
    nest = " ⊇ ".join(f"{n} {nested[n]}" for n in names)
    disj = " · ".join(f"{n} {disjoint[n]}" for n in ["other", *names])
    return (f"{report['tasks']} tasks from {report['documents']} documents ({report['split']} split); entropy from {source}.\n"
            f"Nested bands: {nest}. Disjoint: {disj}.")


def format_scaling(report: dict) -> str:
    """The scaling-law fits as Markdown (empty string when there are none)."""
    fits = report.get("scaling") or []
    if not fits:
        return ""
    lines = ["| run | mode | band | points | A | alpha | P* (%) | R² |", "|---|---|---|---|---|---|---|---|"]
    for f in fits:
        if f["status"] != "ok":
            lines.append(f"| {f['run']} | {f['mode']} | {f['band']} | {f['points']} | {f['status']} | | | |")
            continue
        lines.append(f"| {f['run']} | {f['mode']} | {f['band']} | {f['points']} | {f['A']:.4g} | {f['alpha']:.4g} | "
                     f"{100 * f['p_star']:.2f} | {f['r2']:.4f} |")
    return "\n".join(lines)


def _diff_cell(d: dict) -> str:
    if not d["n"]:
        return "— (0)"
    if d["ci_low"] is None:
        return f"{100 * d['diff']:+.2f}"
    return (f"{100 * d['diff']:+.2f} ({100 * d['ci_low']:+.1f} to {100 * d['ci_high']:+.1f}; "
            f"{d['wins']}/{d['losses']}; p={d['p_value']:.2g})")


def format_paired(report: dict) -> str:
    """Paired differences as Markdown (empty string when fewer than two models were evaluated)."""
    rows = report.get("paired") or []
    if not rows:
        return ""
    names = [*report["bands"], "all"]
    head = ["A − B", "mode"] + [f"{n}" for n in names]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([f"{r['a']} − {r['b']}", r["mode"]] + [_diff_cell(r["bands"][n]) for n in names]) + " |")
    return "\n".join(lines)


PAIRED_LEGEND = ("Accuracy points of A minus B on the same tasks: difference (95% interval; tasks only A got right / "
                 "only B got right; p, exact McNemar). Compared: each --model, the base model, each run's last "
                 "checkpoint.")


def format_report_md(report: dict) -> str:
    parts = ["# rpt eval", ""]
    parts += [f"Tasks: `{report['tasks_dir']}`. Reward: {report['settings']['reward']} matching. "
              f"Cells: accuracy % (correct/n; 95% Wilson interval).", ""]
    parts += [w for w in report["warnings"]] + ([""] if report["warnings"] else [])
    parts += [format_table(report), "", format_band_counts(report), ""]
    if report.get("paired"):
        parts += ["## Paired differences", "", PAIRED_LEGEND, "", format_paired(report), ""]
    if report.get("scaling"):
        parts += ["## Scaling: P(C) = A / C^alpha + P*", "", f"Compute C: {report['compute_formula']}.", "",
                  format_scaling(report), ""]
        if report["files"].get("plot"):
            parts += [f"![accuracy against compute]({Path(report['files']['plot']).name})", ""]
    return "\n".join(parts)
