"""A few predictions to read beside the numbers: report.json's `examples` and report.md's "Examples".

    pick_examples(table, tasks, subjects, modes, band_names, seed) -> [{"model", "mode", "bands": {
        band: {"right": [example, ...], "wrong": [...]}}}]

For each compared subject (each --model, the base model, each run's last checkpoint: the paired
table's endpoints) and mode, and each band (the disjoint label predictions.parquet stores), up to
EXAMPLES_PER_KIND right (reward >= 1, as the accuracy counts them) and as many wrong predictions,
drawn from that group's rows sorted by (task_id, sample) with a generator seeded by the
evaluation's --seed and the group's name: the same predictions give the same examples whatever
the order a resumed evaluation stored them in, and adding a subject leaves the others' alone.
An example holds task_id, sample, the context's last CONTEXT_CHARS characters, the completion
(reasoning and answer modes), prediction, target (the task's continuation or reference answer),
reward and status, each as predictions.parquet and the tasks hold them.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rptdata.bands import OTHER_BAND
from rpttrain.samples import context_tail

EXAMPLES_PER_KIND = 2
CONTEXT_CHARS = 200


def pick_examples(
    table: pa.Table,
    tasks: Sequence[dict],
    subjects: Sequence[tuple[str, str]],
    band_names: Sequence[str],
    seed: int,
    per_kind: int = EXAMPLES_PER_KIND,
    context_chars: int = CONTEXT_CHARS,
) -> list[dict]:
    """Examples of each (label, mode) in `subjects`, band by band ("other" first, then
    `band_names`), right and wrong; a subject with no rows is left out."""
    by_id = {t["task_id"]: t for t in tasks}
    columns = ["task_id", "sample", "band", "prediction", "reward", "completion", "status"]
    out = []
    for label, mode in subjects:
        rows = table.filter(pc.and_(pc.equal(table["model"], label), pc.equal(table["mode"], mode)))
        rows = sorted(
            (r for r in rows.select(columns).to_pylist() if r["task_id"] in by_id),
            key=lambda r: (r["task_id"], r["sample"]),
        )
        if not rows:
            continue
        bands = {}
        for band in [OTHER_BAND, *(b for b in band_names if b != OTHER_BAND)]:
            mine = [r for r in rows if (r["band"] or OTHER_BAND) == band]
            if not mine:
                continue
            bands[band] = {
                kind: [
                    _example(r, by_id[r["task_id"]], context_chars)
                    for r in _draw(
                        [r for r in mine if (r["reward"] >= 1.0) == (kind == "right")],
                        per_kind,
                        seed,
                        f"{label}|{mode}|{band}|{kind}",
                    )
                ]
                for kind in ("right", "wrong")
            }
        out.append({"model": label, "mode": mode, "bands": bands})
    return out


def _draw(rows: list[dict], k: int, seed: int, name: str) -> list[dict]:
    """Up to k of `rows`, without replacement, in their order; seeded by `seed` and `name`.

    >>> rows = [{"i": i} for i in range(10)]
    >>> _draw(rows, 2, 0, "a") == _draw(rows, 2, 0, "a"), len(_draw(rows[:1], 2, 0, "a"))
    (True, 1)
    """
    if len(rows) <= k:
        return rows
    rng = np.random.default_rng([seed, zlib.crc32(name.encode("utf-8"))])
    return [rows[i] for i in sorted(rng.choice(len(rows), size=k, replace=False).tolist())]


def _example(row: dict, task: dict, context_chars: int) -> dict:
    return {
        "task_id": row["task_id"],
        "sample": row["sample"],
        "context": context_tail(task["context"], context_chars),
        "completion": row["completion"],
        "prediction": row["prediction"],
        "target": task["continuation"],
        "reward": row["reward"],
        "status": row["status"],
    }
