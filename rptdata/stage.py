"""Stage directories: the layout, the claim rule, completion markers, the worker split, the driver.

Every stage writes into one directory with the same layout and rules:

    OUT/run.json                  what this run is (stage, fingerprint, config); written first
    OUT/<data>/part-00000.parquet shards, each written to a temporary name and renamed
    OUT/done/<data>-00000.json    completion marker: that shard's rows, bytes and sha256 + its stats,
                                  written after the shard
    OUT/manifest.json             written last: its existence proves the stage finished; its "files"
                                  gathers every marker's {rows, bytes, sha256}

A run into a directory that holds another run (other inputs, options or model) is refused
unless `overwrite=True`; a run with the same fingerprint resumes after the last completed shard.
Readers only ever look at `part-*.parquet`, never at temporary names. `claim_run_dir` is that
rule (refuse / resume / overwrite) for every output directory: the data stages' `StageDir`,
`rpt eval`'s report folder, `rpt train`'s run directory and the TRL and verl backends'.

`run_stage` is the one loop of the sharded stages (prepare, score-entropy, make-tasks): skip the
completed shards, run this worker's others, and write the manifest when the last one is done (by
whichever worker finishes last), else return a progress summary.

Integrity: a consumer checks each shard it opens against its producer's manifest (size, then
sha256) and stops with DamagedFile naming the file and the command that rebuilds it; a producer
rerun into its own directory re-checks every marker and redoes only the damaged shards.

Work is split between processes by `(worker_index, num_workers)` over shard indices, so one
process, a pool and a multi-node launch share one code path. Atomic writes and checked reads are
`rptdata.io`'s.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TypeVar

from rptdata import __version__, faults
from rptdata.errors import BadOption, ManifestMismatch
from rptdata.io import (
    DONE_DIR,
    MANIFEST,
    RUN_FILE,
    digest_problem,
    file_digest,
    fingerprint,
    read_json,
    shard_index,
    shard_name,
    write_json_atomic,
    write_parquet_atomic,
)

T = TypeVar("T")
log = logging.getLogger(__name__)


def worker_split(items: Sequence[T], worker_index: int, num_workers: int) -> list[T]:
    """Round-robin share of `items` for one worker: worker i gets items i, i+n, i+2n, ..."""
    if not 0 <= worker_index < num_workers:
        raise BadOption(f"worker index {worker_index} is outside 0..{num_workers - 1}")
    return list(items[worker_index::num_workers])


def worker_from_env(num_workers: int | None, worker_index: int | None) -> tuple[int, int]:
    """(worker_index, num_workers) from the options, else torchrun's RANK/WORLD_SIZE, else (0, 1)."""
    if num_workers is None and "WORLD_SIZE" in os.environ:
        num_workers = int(os.environ["WORLD_SIZE"])
        worker_index = int(os.environ.get("RANK", "0")) if worker_index is None else worker_index
    num_workers = num_workers or 1
    worker_index = worker_index or 0
    if not 0 <= worker_index < num_workers:
        raise BadOption(f"--worker-index {worker_index} must be in 0..{num_workers - 1}")
    return worker_index, num_workers


def run_stage(
    stage: StageDir,
    units: Sequence[int],
    *,
    done: Callable[[], dict[int, dict]],
    run: Callable[[list[int]], None],
    finish: Callable[[dict[int, dict]], dict],
    worker: int = 0,
    workers: int = 1,
    counts: dict[str, str] | None = None,
    extra: dict | None = None,
) -> dict:
    """The loop of a sharded stage, one for all: skip the completed units, `run` this worker's
    others (they write their shards and markers through `stage`); then the manifest when every
    unit is done (whichever worker gets here last writes it), else this worker's progress:
    {"stage", "complete": False, "worker", **extra, "shards_done", "shards_total", "counts"
    (summed over this worker's done units: summary name -> marker key), "seconds"}.

    units: every unit's index (a shard of the output); `done()`: index -> marker of the complete
    ones; `run(todo)`: do these; `finish(done)`: write the manifest from the markers (returns it).
    """
    units = list(units)
    mine = worker_split(units, worker, workers)
    complete = done()
    todo = [u for u in mine if u not in complete]
    if complete:
        log.info("resuming: %d shard(s) already complete", len(complete))
    if todo:
        run(todo)
        complete = done()
    if all(u in complete for u in units):
        return finish(complete)
    mine = [u for u in mine if u in complete]
    return {
        "stage": stage.stage,
        "complete": False,
        "worker": [worker, workers],
        **(extra or {}),
        "shards_done": sum(u in complete for u in units),
        "shards_total": len(units),
        "counts": {name: sum(int(complete[u].get(key, 0)) for u in mine) for name, key in (counts or {}).items()},
        "seconds": round(sum(float(complete[u].get("seconds", 0)) for u in mine), 2),
    }


def claim_run_dir(
    root: str | Path,
    stage: str,
    identity: dict,
    own: Iterable[str],
    *,
    overwrite: bool = False,
    resume: bool | None = None,
    progress: Sequence[str] = (),
    finished: str | None = None,
) -> str:
    """Claim the output directory `root` for a run of `stage` whose output depends on `identity`.

    Returns "new" (start from scratch), "resume" (same identity, kept work to continue from) or
    "done" (same identity, and `root/finished` exists). Raises ManifestMismatch, naming the
    way out, when the directory must not be written.

    The directory's record is ROOT/run.json, written here for a new run:
    {"stage", "fingerprint" (of `identity`), "rpt_version", "config": identity}.

    own: the names directly under `root` that this stage writes (files or folders). Only these,
        and run.json, are ever removed; anything else in the folder is "foreign".
    overwrite: remove `own` first, then claim the directory as if it were empty.
    resume: None: a run with the same identity continues on its own (the data stages);
        True: continue (`--resume`); False: kept work is refused with "pass --resume".
    progress: glob patterns under `root` that match kept work (completion markers, predictions,
        checkpoints). Work is protected: only `overwrite` removes it.
    finished: a file under `root` whose existence means the run completed.

    The rules, in order:
      1. no run.json (nor a manifest) and foreign files: refused unless `overwrite` (which then
         writes beside them); kept work without a record: refused (it cannot be verified).
      2. the record is another stage's: refused.
      3. another identity: refused (the differing keys are named) when there is kept work,
         else a new run (`own` removed).
      4. the same identity: "done" when finished; "resume" when there is kept work (refused if
         `resume` is False); else "new" (nothing is removed, run.json is kept).
    A caller starts its work from scratch on "new", continues on "resume", stops on "done".

    E.g. `rpt train` would call: claim_run_dir(run_dir, STAGE_TRAIN, {"train": ..., "tasks": ...},
    own=("checkpoints", "metrics.jsonl", "samples.jsonl", "tb", "summary.json", "config.yaml",
    DATA_CACHE), resume=resume, progress=("checkpoints/step-*/state.json",), overwrite=overwrite).
    """
    root = Path(root)
    own = {*own, RUN_FILE}
    if overwrite:
        _remove(root, own)
    record = _recorded_run(root)
    kept = root.exists() and any(next(root.glob(pattern), None) is not None for pattern in progress)
    fp = fingerprint(identity)
    if record is None:
        foreign = sorted(p.name for p in root.iterdir() if _own_name(p.name) not in own) if root.exists() else []
        if foreign and not overwrite:
            raise ManifestMismatch(
                f"{root} is not empty ({foreign[0]}) and is not an `rpt {stage}` directory; refusing to write "
                "into it (choose another --out, or pass --overwrite to clear our files there and write beside the rest)."
            )
        if kept:
            raise ManifestMismatch(
                f"{root} holds `rpt {stage}` output but no {RUN_FILE} saying how it was made; "
                "pass --overwrite to replace it, or choose another --out."
            )
        return _start_run(root, stage, fp, identity, own)
    if record.get("stage") != stage:
        raise ManifestMismatch(
            f"{root} holds a `rpt {record.get('stage')}` run, not `rpt {stage}`; choose another --out."
        )
    if record.get("fingerprint") != fp:
        if not kept:  # an empty false start has nothing to protect
            return _start_run(root, stage, fp, identity, own)
        diff = _diff_keys(record.get("config") or {}, identity)
        raise ManifestMismatch(
            f"{root} already holds a `rpt {stage}` run with different settings ({', '.join(diff) or 'fingerprint'} "
            "differ; other settings cannot resume it). Use another --out, or pass --overwrite to replace it."
        )
    if finished is not None and (root / finished).exists():
        return "done"
    if not kept:
        return "new"
    if resume is False:
        raise ManifestMismatch(
            f"{root} already holds a `rpt {stage}` run with these settings; pass --resume to continue it "
            "(work already done is kept), --overwrite to start over, or choose another --out."
        )
    return "resume"


def _recorded_run(root: Path) -> dict | None:
    """What a directory says it holds: its run.json, else (an older layout) its manifest."""
    for name in (RUN_FILE, MANIFEST):
        path = root / name
        if path.exists():
            return read_json(path, f"pass --overwrite to start {root} over, or choose another --out")
    return None


def _start_run(root: Path, stage: str, fp: str, identity: dict, own: set[str]) -> str:
    _remove(root, own)
    write_json_atomic(
        root / RUN_FILE, {"stage": stage, "fingerprint": fp, "rpt_version": __version__, "config": identity}
    )
    return "new"


def _own_name(name: str) -> str:
    """The file a temporary name stands for ("run.json.tmp-123" -> "run.json"): what a run killed
    mid-write leaves is its own, not foreign.

    >>> _own_name("run.json.tmp-4242"), _own_name("notes.txt")
    ('run.json', 'notes.txt')
    """
    return name.split(".tmp-", 1)[0]


def _remove(root: Path, names: Iterable[str]) -> None:
    """Remove these files or folders directly under `root`, and their temporary copies (never anything else)."""
    for name in names:
        for path in [root / name, *root.glob(f"{name}.tmp-*")] if root.exists() else []:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


class StageDir:
    """One stage's output directory; see the module docstring for the layout."""

    def __init__(self, root: Path, stage: str, data_dirs: Iterable[str]):
        self.root = Path(root)
        self.stage = stage
        self.data_dirs = list(data_dirs)

    # -- run identity ---------------------------------------------------------------------
    def begin(self, config: dict, overwrite: bool = False) -> str:
        """Claim the directory for a run with this config (`claim_run_dir`; resume is automatic).

        Returns "new", "resume" (same config, unfinished) or "done" (same config, finished).
        Raises ManifestMismatch when the directory holds a different run and not `overwrite`.
        """
        state = claim_run_dir(
            self.root,
            self.stage,
            config,
            self._own_names(),
            overwrite=overwrite,
            progress=(MANIFEST, f"{DONE_DIR}/*.json"),
            finished=MANIFEST,
        )
        if state != "new":
            for line in self.repair():
                log.warning("redoing a damaged shard: %s", line)
            if not (self.root / MANIFEST).exists():
                state = "resume"
        faults.hit("begin")
        return state

    def _own_names(self) -> set[str]:
        return {*self.data_dirs, DONE_DIR, MANIFEST, RUN_FILE, "rejects.jsonl"}

    # -- shards -----------------------------------------------------------------------------
    def shard_path(self, data_dir: str, index: int) -> Path:
        return self.root / data_dir / shard_name(index)

    def marker_path(self, data_dir: str, index: int) -> Path:
        return self.root / DONE_DIR / f"{data_dir}-{index:05d}.json"

    def write_shard(self, data_dir: str, index: int, table, stats: dict) -> Path:
        """Write the shard, then its completion marker with its stats (in that order)."""
        path = self.shard_path(data_dir, index)
        write_parquet_atomic(table, path)
        faults.hit("marker", path)
        record = {"shard": path.name, "rows": table.num_rows, **file_digest(path), "time": time.time()}
        write_json_atomic(self.marker_path(data_dir, index), {**record, **stats})
        return path

    def done_shards(self, data_dir: str) -> dict[int, dict]:
        """index -> marker of every shard whose marker parses and whose file is there, of the
        recorded size (`begin` has checked the checksums of what an earlier run left)."""
        out = {}
        for marker in sorted((self.root / DONE_DIR).glob(f"{data_dir}-*.json")):
            index = shard_index(marker)
            record = self._marker(marker)
            if record is not None and (
                record.get("empty")  # a shard with no rows: its marker alone
                or digest_problem(self.shard_path(data_dir, index), record, checksum=False) is None
            ):
                out[index] = record
        return out

    @staticmethod
    def _marker(path: Path) -> dict | None:
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) else None

    def repair(self) -> list[str]:
        """Check every completion marker and its shard (size, sha256) and the manifest against them;
        remove what is damaged (a shard and its marker, a stale manifest) so that the run redoes it.
        Returns what was removed, one line each."""
        removed = []
        records = {}
        for data_dir in self.data_dirs:
            for marker in sorted((self.root / DONE_DIR).glob(f"{data_dir}-*.json")):
                shard = self.shard_path(data_dir, shard_index(marker))
                record = self._marker(marker)
                if record is not None and record.get("empty"):
                    continue
                problem = (
                    "its marker does not parse"
                    if record is None
                    else (digest_problem(shard, record) or _rows_problem(shard, record))
                )
                if problem is None:
                    records[f"{data_dir}/{shard.name}"] = record
                    continue
                removed.append(f"{shard}: {problem}")
                shard.unlink(missing_ok=True)
                marker.unlink()
        manifest = self.root / MANIFEST
        if manifest.exists():
            recorded = self._marker(manifest)
            if recorded is None:
                removed.append(f"{manifest}: does not parse")
            elif removed or ("files" in recorded and recorded["files"] != _files(records)):
                removed.append(f"{manifest}: its shards changed")
            else:
                return removed
            manifest.unlink()
        return removed

    def finish(self, manifest: dict) -> dict:
        """Write manifest.json last; it carries the run's fingerprint and config."""
        run = read_json(self.root / RUN_FILE, f"pass --overwrite to redo {self.root}")
        records = {}
        for data_dir in self.data_dirs:
            for marker in sorted((self.root / DONE_DIR).glob(f"{data_dir}-*.json")):
                record = read_json(marker, f"rerun `rpt {self.stage}` into {self.root}; it redoes that shard")
                if not record.get("empty"):
                    records[f"{data_dir}/{record['shard']}"] = record
        full = {
            "stage": self.stage,
            "rpt_version": __version__,
            "fingerprint": run["fingerprint"],
            "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **manifest,
            "files": _files(records),
            "config": run["config"],
        }
        faults.hit("manifest")
        write_json_atomic(self.root / MANIFEST, full)
        return full


def _rows_problem(shard: Path, record: dict) -> str | None:
    """Whether the shard's Parquet footer disagrees with its marker's row count (a cheap read)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if "rows" not in record:
        return None
    try:
        rows = pq.read_metadata(shard).num_rows
    except (pa.ArrowException, OSError) as e:
        return f"its footer does not parse ({e})"
    return None if rows == record["rows"] else f"{rows} rows, its marker says {record['rows']}"


def _files(records: dict[str, dict]) -> dict[str, dict]:
    """The manifest's "files": shard path -> {rows, bytes, sha256} from its completion marker."""
    return {rel: {k: r[k] for k in ("rows", "bytes", "sha256") if k in r} for rel, r in sorted(records.items())}


def _diff_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _diff_keys(a, b, f"{prefix}{k}.")
        elif json.dumps(a, sort_keys=True, default=str) != json.dumps(b, sort_keys=True, default=str):
            keys.append(prefix + k)
    return keys
