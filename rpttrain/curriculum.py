"""`--curriculum easy-to-hard` (RMT, arXiv 2509.24375): which entropy band a step samples its
tasks from moves from the easiest to the hardest between 30% and 70% of the run.

    tiers = band_tiers(manifest, counts)           # ["easy", "medium", "hard"]: the bands, easy first
    band_weights(0.5, 3)                           # [0, 1, 0]: half-way, all from the middle band
    sampler = CurriculumSampler(rows, tiers, seed=0, steps=1000)
    sampler.at_step(t); sampler.take(256)          # tasks of step t, a pure function of (seed, t, call)

The paper draws a tier d ~ Categorical(p_t), then a token uniformly from that tier, with p_t
piecewise linear in t between two distributions set at t1 and t2. The tiers here are the bands
the tasks carry (make-tasks' `band`, thresholds from its manifest), easiest first; a task below
the lowest threshold ("other") joins the easiest band, and a band with no training task is left
out. Before `start` (t/T) every task comes from the easiest band, after `end` from the hardest;
between them the weight moves linearly from band to band, through each middle band in turn (with
two bands this is the paper's interpolation between one-hot distributions). docs/family.md says
why: the paper's own p_t1 and p_t2 are not stated in what we could read.

A step's batch is drawn from a generator seeded by (seed, step, call within the step): resume needs
no sampler state, and a resumed run draws what the uninterrupted run drew. Within a step, tasks of
a band are drawn without replacement while the band has enough; across steps, with replacement
(the paper samples uniformly). Memory: one index array of 4 bytes per task, like `EpochSampler`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rptdata.bands import DEFAULT_BANDS, OTHER_BAND, as_bands
from rptdata.errors import RptError
from rpttrain.data import EpochSampler

CURRICULA = ("none", "easy-to-hard")


def make_sampler(config, source, tasks_manifest: dict, cursor: dict):
    """The run's sampler: `CurriculumSampler` for --curriculum easy-to-hard, else the seeded epochs
    of `EpochSampler` from the checkpoint's cursor."""
    if config.curriculum == "easy-to-hard":
        return CurriculumSampler(
            source, tasks_manifest, config.seed, config.steps, config.curriculum_start, config.curriculum_end
        )
    return EpochSampler(source, config.seed, **cursor)


def band_weights(progress: float, n_bands: int, start: float = 0.3, end: float = 0.7) -> np.ndarray:
    """Sampling weights of `n_bands` bands (easiest first) at `progress` = t / T.

    >>> [band_weights(p, 3).round(6).tolist() for p in (0.1, 0.5, 0.9)]
    [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    >>> band_weights(0.4, 2).round(6).tolist()
    [0.75, 0.25]
    """
    if n_bands < 1:
        raise ValueError("a curriculum needs at least one band")
    if not 0 <= start < end <= 1:
        raise ValueError(f"need 0 <= start < end <= 1 (got {start}, {end})")
    tau = min(max((progress - start) / (end - start), 0.0), 1.0)
    where = round(
        tau * (n_bands - 1), 12
    )  # along the bands: 0 = easiest, n - 1 = hardest (rounded: 0.3 + 0.2 is not 0.5)
    w = np.maximum(0.0, 1.0 - np.abs(np.arange(n_bands) - where))
    return w / w.sum()


def band_tiers(tasks_manifest: dict, band_column: pa.ChunkedArray) -> list[list[str]]:
    """The curriculum's tiers, easiest first: each a list of band labels (the easiest also holds
    "other"), only those with a training task. Thresholds from the manifest's `bands`, else the
    paper's (rptdata.bands.DEFAULT_BANDS)."""
    bands = [name for name, _ in sorted(as_bands(tasks_manifest.get("bands") or DEFAULT_BANDS), key=lambda b: b[1])]
    present = set(pc.unique(band_column).to_pylist())
    unknown = present - set(bands) - {OTHER_BAND, None}
    if unknown:
        raise RptError(f"tasks carry bands {sorted(unknown)} that their manifest's bands {bands} do not name")
    tiers = [[b] for b in bands]
    tiers[0].append(OTHER_BAND)
    return [t for t in tiers if present & set(t)]


class CurriculumSampler:
    """Tasks of `rows` (TaskRows) drawn band by band on the easy-to-hard schedule of a
    `steps`-step run; `at_step(t)` before the step's draws."""

    def __init__(self, rows, tasks_manifest: dict, seed: int, steps: int, start: float = 0.3, end: float = 0.7):
        if "band" not in rows.table.column_names:
            raise RptError(
                "--curriculum easy-to-hard samples by band, and these tasks carry no `band` column (made by an "
                "older make-tasks); rebuild them with rpt make-tasks"
            )
        column = rows.table.column("band")
        self.tiers = band_tiers(tasks_manifest, column)
        if not self.tiers:
            raise RptError("nothing to train on: the training split is empty")
        self.rows, self.seed, self.steps, self.start, self.end = rows, seed, steps, start, end
        self.index = [_rows_in(column, tier) for tier in self.tiers]
        self.step, self.calls = 0, 0

    def at_step(self, step: int) -> None:
        self.step, self.calls = step, 0

    def weights(self, step: int) -> np.ndarray:
        return band_weights(step / self.steps, len(self.tiers), self.start, self.end)

    def schedule_metrics(self) -> dict:
        """This step's weight of each band (named by its first label), for metrics.jsonl."""
        return {f"curriculum_weight_{tier[0]}": float(w) for tier, w in zip(self.tiers, self.weights(self.step))}

    def pick(self, n: int) -> list[int]:
        """Row indices of the next `n` tasks of this step."""
        rng = np.random.default_rng([self.seed, self.step, self.calls, 0x524D54])
        self.calls += 1
        counts = rng.multinomial(n, self.weights(self.step))
        picked = []
        for index, k in zip(self.index, counts):
            if k:
                picked.extend(rng.choice(index, size=int(k), replace=int(k) > len(index)).tolist())
        return [picked[i] for i in rng.permutation(len(picked))]

    def take(self, n: int) -> list[dict]:
        return self.rows.take(self.pick(n))

    def cursor(self) -> dict:
        return {}  # nothing to save: a step's draws depend on (seed, step) alone


def _rows_in(column: pa.ChunkedArray, labels: Sequence[str]) -> np.ndarray:
    """Row numbers whose band is one of `labels`, as uint32 where they fit (chunk by chunk)."""
    out, offset = [], 0
    for chunk in column.chunks:
        hit = pc.is_in(chunk, value_set=pa.array(list(labels), type=chunk.type)).fill_null(False)
        if OTHER_BAND in labels:  # a task with no band label is below every threshold: the easiest
            hit = pc.or_(hit, pc.is_null(chunk))
        out.append(np.flatnonzero(hit.to_numpy(zero_copy_only=False)) + offset)
        offset += len(chunk)
    rows = np.concatenate(out) if out else np.zeros(0, dtype=np.int64)
    return rows.astype(np.uint32) if offset < 2**32 else rows
