"""REPORT_DIR on disk: its file names, the claim on the folder, and the predictions store.

claim_report_dir(config, out, identity)    # refuse / resume / overwrite (claim_run_dir); run.json
store = Store(out)                         # out/predictions/part-NNNNN.parquet
store.done() -> {(task_id, model, mode)}   # what a resumed evaluation skips
store.write(rows); store.table()
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rptdata import faults
from rptdata.io import RUN_FILE, list_shards, shard_index, shard_name, write_parquet_atomic
from rptdata.stage import claim_run_dir
from rpttrain.eval.config import STAGE, EvalConfig
from rpttrain.eval.harness import HARNESS_DIR

PREDICTIONS_DIR = "predictions"
PREDICTIONS_FILE = "predictions.parquet"
BAND_ENTROPY_FILE = "band_entropy.parquet"
PLOT_FILE = "scaling.png"
HARNESS_PLOT_FILE = "lm_eval.png"
OWN_NAMES = {
    RUN_FILE,
    PREDICTIONS_DIR,
    PREDICTIONS_FILE,
    BAND_ENTROPY_FILE,
    PLOT_FILE,
    HARNESS_PLOT_FILE,
    HARNESS_DIR,
    "report.md",
    "report.json",
}

PREDICTIONS_SCHEMA = pa.schema(
    [
        ("task_id", pa.string()),
        ("model", pa.string()),  # the row label: a model name, or RUN@STEP for checkpoints
        ("mode", pa.string()),  # ntp | reasoning
        ("sample", pa.int32()),  # 0..K-1
        ("prediction", pa.string()),  # null when the format extracted nothing (answer mode: math-verify's reading)
        ("reward", pa.float64()),
        ("band", pa.string()),  # the highest band the task's entropy exceeds, or "other"
        ("entropy", pa.float32()),  # the entropy the band comes from
        ("model_entropy", pa.float32()),  # ntp: the model's full-softmax next-token entropy
        ("new_tokens", pa.int32()),  # tokens the model produced for this sample
        ("completion", pa.string()),  # reasoning and answer modes: the generated text (ntp: null)
        ("status", pa.string()),  # answer mode: the math check's status, ok | no_answer | timeout | error
    ]
)


def empty_rows() -> dict[str, list]:
    """One empty list per PREDICTIONS_SCHEMA column: a chunk's rows before `Store.write`."""
    return {f.name: [] for f in PREDICTIONS_SCHEMA}


class Store:
    """REPORT_DIR/predictions/part-NNNNN.parquet, one per flushed chunk."""

    def __init__(self, root: Path):
        self.dir = root / PREDICTIONS_DIR
        self.parts = list_shards(self.dir)
        self.next = 1 + max((shard_index(p) for p in self.parts), default=-1)

    def done(self) -> set[tuple[str, str, str]]:
        keys: set[tuple[str, str, str]] = set()
        for path in self.parts:
            t = pq.read_table(path, columns=["task_id", "model", "mode"])
            keys.update(zip(*(t.column(c).to_pylist() for c in ("task_id", "model", "mode"))))
        return keys

    def write(self, rows: dict[str, list]) -> None:
        faults.hit("eval-chunk")
        path = self.dir / shard_name(self.next)
        write_parquet_atomic(pa.Table.from_pydict(rows, schema=PREDICTIONS_SCHEMA), path)
        self.parts.append(path)
        self.next += 1

    def table(self) -> pa.Table:
        if not self.parts:
            return PREDICTIONS_SCHEMA.empty_table()
        return pa.concat_tables([pq.read_table(p, schema=PREDICTIONS_SCHEMA) for p in self.parts])

    def copy(self, source: str, label: str, wanted: set[tuple[str, str]]) -> None:
        """Store `source`'s predictions again under `label`, for the (task_id, mode) pairs in `wanted`."""
        if not wanted:
            return
        table = self.table()
        rows = empty_rows()
        for r in table.filter(pc.equal(table.column("model"), source)).to_pylist():
            if (r["task_id"], r["mode"]) in wanted:
                r["model"] = label
                for name, values in rows.items():
                    values.append(r[name])
        self.write(rows)


def claim_report_dir(config: EvalConfig, out: Path, identity: dict) -> None:
    """Make `out` this evaluation's folder (`rptdata.stage.claim_run_dir`): a foreign folder is
    refused; kept predictions need --resume (same settings) or --overwrite."""
    claim_run_dir(
        out,
        STAGE,
        identity,
        OWN_NAMES,
        overwrite=config.overwrite,
        resume=config.resume,
        progress=(f"{PREDICTIONS_DIR}/*", f"{HARNESS_DIR}/results/*"),
    )
    out.mkdir(parents=True, exist_ok=True)
