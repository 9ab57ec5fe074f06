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
        unit: what a task predicts: "token" (the next tokens, RPT), "sentence" (the next sentence,
            RLPT's ASR; with `masked` the middle sentence, RLPT's MSR) or "span" (a masked span of
            1..`span_words` words, PretrainZero). See `rptdata.tasks.units` and docs/tasks.md.
        masked: sentence unit only: the task carries the following sentence (`context_after`).
        min_sentence_words: sentences with fewer words are not targets (`short_sentence`).
        max_target_tokens: sentences that overlap more tokens are not targets (`long_target`).
        context_after_tokens: at most this many tokens of `context_after` (masked units).
        span_words: a span holds 1..N words.
        span_select: "random" start words (seeded), or "entropy": the words whose first token has
            the highest entropy first.
        spans_per_paragraph: span slots per paragraph.
        unit_entropy: a unit's `entropy` (what --threshold and the bands read): "mean" of its
            scored tokens' entropies, or that of its "first" token.
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
    unit: str = "token"
    masked: bool = False
    min_sentence_words: int = 3
    max_target_tokens: int = 128
    context_after_tokens: int = 256
    span_words: int = 3
    span_select: str = "random"
    spans_per_paragraph: int = 1
    unit_entropy: str = "mean"
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
        self._check_unit()
        for name, cap in (("--max-tasks", self.max_tasks), ("--max-eval-tasks", self.max_eval_tasks)):
            if cap is not None and cap < 0:
                raise BadOption(f"{name} must be 0 or more (or left out for no cap); got {cap}")

    def _check_unit(self) -> None:
        from rptdata.tasks.units import SPAN_SELECT, UNIT_ENTROPY, UNITS

        if self.unit not in UNITS:
            raise BadOption(f"--unit must be one of {', '.join(UNITS)}, not {self.unit!r}")
        if self.masked and self.unit != "sentence":
            what = (
                "span tasks are always masked" if self.unit == "span" else "token tasks have nothing after the target"
            )
            raise BadOption(f"--masked is for --unit sentence (the masked middle sentence); {what}")
        if self.min_live is not None and self.unit != "token":
            raise BadOption(
                "--min-live estimates one-token predictions under the prefix reward; it has no estimate for "
                f"--unit {self.unit}"
            )
        if self.span_select not in SPAN_SELECT:
            raise BadOption(f"--span-select must be one of {', '.join(SPAN_SELECT)}, not {self.span_select!r}")
        if self.unit_entropy not in UNIT_ENTROPY:
            raise BadOption(f"--unit-entropy must be one of {', '.join(UNIT_ENTROPY)}, not {self.unit_entropy!r}")
        for name, value in (
            ("--min-sentence-words", self.min_sentence_words),
            ("--max-target-tokens", self.max_target_tokens),
            ("--context-after-tokens", self.context_after_tokens),
            ("--span-words", self.span_words),
            ("--spans-per-paragraph", self.spans_per_paragraph),
        ):
            if value < 1:
                raise BadOption(f"{name} must be at least 1; got {value}")

    def identity(self) -> dict:
        """The options that decide the output (not where it goes or how it is shown). The unit's
        options only count for that unit, so a token run's identity is what it was before units."""
        d = asdict(self)
        for k in ("scored_dir", "out", "prepared_dir", "overwrite", "progress"):
            d.pop(k)
        unit_only = {
            "sentence": ("masked", "min_sentence_words", "max_target_tokens", "context_after_tokens"),
            "span": ("span_words", "span_select", "spans_per_paragraph", "context_after_tokens"),
        }
        if self.unit == "token":
            d.pop("unit")
        else:
            d.pop("continuation_tokens")
        keep = set(unit_only.get(self.unit, ())) | ({"unit_entropy"} if self.unit != "token" else set())
        for k in {k for ks in unit_only.values() for k in ks} | {"unit_entropy"}:
            if k not in keep:
                d.pop(k, None)
        d["bands"] = [list(b) for b in self.bands]
        return d


# ---------------------------------------------------------------------------------------------
# one shard, vectorized filters
