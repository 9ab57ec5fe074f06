"""`rpt make-tasks` options (`MakeTasksConfig`) and the reasons a position is skipped; the stage is
`rptdata.tasks`, its shard readers and filters `rptdata.tasks.inputs`."""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import asdict, dataclass

from rptdata.bands import DEFAULT_BANDS, as_bands
from rptdata.errors import BadOption
from rptdata.io import STAGE_TASKS

log = logging.getLogger(__name__)


STAGE = STAGE_TASKS
POSITIONS_DIR = "positions"
DOCS_DIR = "docs"
SKIP_REASONS = (
    "nan_entropy",  # the scorer wrote no entropy for this position
    "below_threshold",  # entropy < --threshold
    "mid_character",  # the context would end inside a multi-byte character
    "empty_context",  # position 0, or a context window that holds no whole character
    "low_live",  # a training position whose predicted live-group probability is below --min-live
    "over_max_tasks",  # an eligible training task beyond --max-tasks
    "over_max_eval_tasks",  # an eligible evaluation task beyond --max-eval-tasks
)

# ---------------------------------------------------------------------------------------------
# pure helpers


def task_key(task_id: str, seed: int) -> int:
    """The seeded hash that orders tasks for --max-tasks (smallest kept)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:task:{task_id}".encode()).digest()[:16], "big")


# ---------------------------------------------------------------------------------------------
# config


@dataclass(frozen=True)
class MakeTasksConfig:
    """Options of `rpt make-tasks`.

    Fields:
        scored_dir: a finished `rpt score-entropy` directory.
        out: where to write the tasks.
        threshold: keep positions with entropy >= threshold (the paper does not state its
            value; 0.5 is the lower edge of its easy split). 0 keeps every position.
        context_tokens: at most this many tokens of context before the position.
        continuation_tokens: tokens in the continuation (the longest prediction that scores).
        eval_fraction: share of documents held out for evaluation (by a seeded hash).
        seed: seeds the document split and the --max-tasks sample.
        max_tasks / max_eval_tasks: keep at most this many training / evaluation tasks, a
            seeded uniform sample of the eligible ones (None: all).
        bands: (name, threshold) pairs, increasing; a task's band is the highest it exceeds.
        min_live: drop training positions whose predicted probability of a mixed-reward group
            (`live`) is below this (None: keep all). Evaluation positions are never dropped.
        group_size / temperature: G and T of the live estimate (`rptdata.tasks.live`); match the
            trainer's group size and sampling temperature.
        prepared_dir: the `rpt prepare` directory; default: the one the scored manifest names.
        overwrite: replace a run in `out` made with other options.
        progress: show a progress bar.
    """

    scored_dir: str
    out: str
    threshold: float = 0.5
    context_tokens: int = 1024
    continuation_tokens: int = 8
    eval_fraction: float = 0.1
    seed: int = 0
    max_tasks: int | None = None
    max_eval_tasks: int | None = None
    bands: tuple[tuple[str, float], ...] = DEFAULT_BANDS
    min_live: float | None = None
    group_size: int = 8
    temperature: float = 0.8
    prepared_dir: str | None = None
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self):
        object.__setattr__(self, "bands", as_bands(self.bands))
        if not math.isfinite(self.threshold):
            raise BadOption(f"--threshold must be a finite number, not {self.threshold}")
        if self.context_tokens < 1:
            raise BadOption("--context-tokens must be at least 1: a task needs some context to predict from")
        if self.continuation_tokens < 1:
            raise BadOption("--continuation-tokens must be at least 1: the continuation holds the target token")
        if not 0.0 <= self.eval_fraction <= 1.0:
            raise BadOption(f"--eval-fraction is a share of documents, between 0 and 1; got {self.eval_fraction}")
        if self.min_live is not None and not 0.0 <= self.min_live <= 1.0:
            raise BadOption(f"--min-live is a probability, between 0 and 1; got {self.min_live}")
        if self.group_size < 2:
            raise BadOption(
                f"--group-size must be at least 2: one sample cannot disagree with itself; got {self.group_size}"
            )
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise BadOption(
                f"--temperature must be a positive number (the sampling temperature); got {self.temperature}"
            )
        for name, cap in (("--max-tasks", self.max_tasks), ("--max-eval-tasks", self.max_eval_tasks)):
            if cap is not None and cap < 0:
                raise BadOption(f"{name} must be 0 or more (or left out for no cap); got {cap}")

    def identity(self) -> dict:
        """The options that decide the output (not where it goes or how it is shown)."""
        d = asdict(self)
        for k in ("scored_dir", "out", "prepared_dir", "overwrite", "progress"):
            d.pop(k)
        d["bands"] = [list(b) for b in self.bands]
        return d


# ---------------------------------------------------------------------------------------------
# one shard, vectorized filters
