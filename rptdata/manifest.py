"""Stage directories: manifests, completion markers, atomic writes, worker splits.

Every stage writes into one directory with the same layout and rules:

    OUT/run.json                  what this run is (stage, fingerprint, config); written first
    OUT/<data>/part-00000.parquet shards, each written to a temporary name and renamed
    OUT/done/<data>-00000.json    completion marker + that shard's stats, written after the shard
    OUT/manifest.json             written last: its existence proves the stage finished

A run into a directory that holds another run (other inputs, options or model) is refused
unless `overwrite=True`; a run with the same fingerprint resumes after the last completed shard.
Readers only ever look at `part-*.parquet`, never at temporary names. `claim_run_dir` is that
rule (refuse / resume / overwrite) for every output directory: the data stages' `StageDir`,
`rpt eval`'s report folder and `rpt train`'s run directory.

Work is split between processes by `(worker_index, num_workers)` over shard indices, so one
process, a pool and a multi-node launch share one code path.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterable, Sequence, TypeVar

from rptdata import __version__
from rptdata.errors import ManifestMismatch, MissingUpstream

MANIFEST = "manifest.json"
RUN_FILE = "run.json"
DONE_DIR = "done"
T = TypeVar("T")

# The stage names: `rpt <name>`, and the "stage" field of every run.json and manifest.json.
STAGE_PREPARE = "prepare"
STAGE_SCORE = "score-entropy"
STAGE_TASKS = "make-tasks"
STAGE_EXPORT = "export-tasks"
STAGE_TRAIN = "train"
STAGE_EVAL = "eval"


def fingerprint(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def write_json_atomic(path: Path, obj: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)


def write_parquet_atomic(table, path: Path, **kwargs) -> None:
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp, **kwargs)
    os.replace(tmp, path)


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def shard_index(path: str | Path) -> int:
    """The index in a shard or marker name: the number after the last "-" of the file's stem.

    >>> shard_index("out/docs/part-00012.parquet"), shard_index("done/train-00003.json")
    (12, 3)
    """
    stem = Path(path).stem
    try:
        return int(stem.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        raise ValueError(f"{path}: not a shard name (expected part-NNNNN.parquet or <dir>-NNNNN.json)") from None


def list_shards(folder: Path) -> list[Path]:
    """The finished shards of a folder, in index order (temporary files are ignored)."""
    folder = Path(folder)
    return sorted(p for p in folder.glob("part-*.parquet") if p.name.endswith(".parquet"))


def read_manifest(root: Path, stage: str | None = None) -> dict:
    """The manifest of a finished stage directory, or MissingUpstream with a reason."""
    path = Path(root) / MANIFEST
    if not path.exists():
        hint = " (is the stage still running, or did it stop early? run it again to resume)" if (
            Path(root) / RUN_FILE
        ).exists() else ""
        raise MissingUpstream(f"{root}: no {MANIFEST}; not a finished rpt stage directory{hint}")
    manifest = json.loads(path.read_text())
    if stage is not None and manifest.get("stage") != stage:
        raise MissingUpstream(f"{root}: expected the output of `rpt {stage}`, found `{manifest.get('stage')}`")
    return manifest


def worker_split(items: Sequence[T], worker_index: int, num_workers: int) -> list[T]:
    """Round-robin share of `items` for one worker: worker i gets items i, i+n, i+2n, ..."""
    if not 0 <= worker_index < num_workers:
        raise ValueError(f"worker index {worker_index} is outside 0..{num_workers - 1}")
    return list(items[worker_index::num_workers])


def worker_from_env(num_workers: int | None, worker_index: int | None) -> tuple[int, int]:
    """(worker_index, num_workers) from the options, else torchrun's RANK/WORLD_SIZE, else (0, 1)."""
    if num_workers is None and "WORLD_SIZE" in os.environ:
        num_workers = int(os.environ["WORLD_SIZE"])
        worker_index = int(os.environ.get("RANK", "0")) if worker_index is None else worker_index
    num_workers = num_workers or 1
    worker_index = worker_index or 0
    if not 0 <= worker_index < num_workers:
        raise ValueError(f"--worker-index {worker_index} must be in 0..{num_workers - 1}")
    return worker_index, num_workers


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
        foreign = sorted(p.name for p in root.iterdir() if p.name not in own) if root.exists() else []
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
            return json.loads(path.read_text())
    return None


def _start_run(root: Path, stage: str, fp: str, identity: dict, own: set[str]) -> str:
    _remove(root, own)
    write_json_atomic(root / RUN_FILE, {"stage": stage, "fingerprint": fp, "rpt_version": __version__, "config": identity})
    return "new"


def _remove(root: Path, names: Iterable[str]) -> None:
    """Remove these files or folders directly under `root` (never anything else)."""
    for name in names:
        path = root / name
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
        return claim_run_dir(
            self.root, self.stage, config, self._own_names(), overwrite=overwrite,
            progress=(MANIFEST, f"{DONE_DIR}/*.json"), finished=MANIFEST,
        )

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
        write_json_atomic(self.marker_path(data_dir, index), {"shard": path.name, "time": time.time(), **stats})
        return path

    def done_shards(self, data_dir: str) -> dict[int, dict]:
        """index -> stats of every shard whose marker exists (and whose file is there)."""
        out = {}
        for marker in sorted((self.root / DONE_DIR).glob(f"{data_dir}-*.json")):
            index = shard_index(marker)
            if self.shard_path(data_dir, index).exists() or json.loads(marker.read_text()).get("empty"):
                out[index] = json.loads(marker.read_text())
        return out

    def finish(self, manifest: dict) -> dict:
        """Write manifest.json last; it carries the run's fingerprint and config."""
        run = json.loads((self.root / RUN_FILE).read_text())
        full = {
            "stage": self.stage,
            "rpt_version": __version__,
            "fingerprint": run["fingerprint"],
            "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **manifest,
            "config": run["config"],
        }
        write_json_atomic(self.root / MANIFEST, full)
        return full


def _diff_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _diff_keys(a, b, f"{prefix}{k}.")
        elif json.dumps(a, sort_keys=True, default=str) != json.dumps(b, sort_keys=True, default=str):
            keys.append(prefix + k)
    return keys
