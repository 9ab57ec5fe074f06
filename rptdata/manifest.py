"""Stage directories: manifests, completion markers, atomic writes, worker splits.

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
`rpt eval`'s report folder and `rpt train`'s run directory.

Integrity: a consumer checks each shard it opens against its producer's manifest (size, then
sha256) and stops with DamagedFile naming the file and the command that rebuilds it; a producer
rerun into its own directory re-checks every marker and redoes only the damaged shards.

Work is split between processes by `(worker_index, num_workers)` over shard indices, so one
process, a pool and a multi-node launch share one code path.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from contextlib import contextmanager
from typing import Any, Iterable, Iterator, Sequence, TypeVar

from rptdata import __version__, faults
from rptdata.errors import BadOption, DamagedFile, ManifestMismatch, MissingUpstream

MANIFEST = "manifest.json"
RUN_FILE = "run.json"
DONE_DIR = "done"
T = TypeVar("T")
log = logging.getLogger(__name__)

# The stage names: `rpt <name>`, and the "stage" field of every run.json and manifest.json.
STAGE_PREPARE = "prepare"
STAGE_SCORE = "score-entropy"
STAGE_TASKS = "make-tasks"
STAGE_EXPORT = "export-tasks"
STAGE_TRAIN = "train"
STAGE_EVAL = "eval"


def fingerprint(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


@contextmanager
def atomic_file(path: Path, fault: str | None = None) -> Iterator[Path]:
    """Write to the yielded temporary path beside `path`; when the block ends without an error it
    is renamed onto `path` (readers see the old file or the whole new one, never a part). A failed
    write (disk full) leaves no temporary file behind. `fault`: the RPT_FAULT point hit between
    the write and the rename."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        if fault:
            faults.hit(fault, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: Path, obj: Any) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, fault="json-tmp") as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def truncate_jsonl(path: Path, step: int) -> None:
    r"""Keep the lines of a step log (metrics.jsonl, samples.jsonl) up to `step`, atomically: the
    lines after it are redone after a resume, and a line cut short by a crash (or empty) is dropped.

    >>> import tempfile; p = Path(tempfile.mkdtemp()) / "m.jsonl"
    >>> _ = p.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"ste')
    >>> truncate_jsonl(p, 2); p.read_text()
    '{"step": 1}\n{"step": 2}\n'
    """
    if not path.exists():
        return

    def step_of(line: str) -> float:
        try:
            return json.loads(line).get("step", 0)
        except (ValueError, AttributeError):
            return float("inf")

    keep = [line for line in path.read_text().splitlines() if step_of(line) <= step]
    write_text_atomic(path, "".join(line + "\n" for line in keep))


def write_parquet_atomic(table, path: Path, **kwargs) -> None:
    import pyarrow.parquet as pq

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, fault="shard-tmp") as tmp:
        pq.write_table(table, tmp, **kwargs)


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


# -- integrity -------------------------------------------------------------------------------------
DIGEST_CHUNK = 1 << 20


def file_digest(path: str | Path) -> dict:
    """{"bytes", "sha256"} of a file, read in 1 MiB chunks (hashlib releases the GIL meanwhile).

    >>> import tempfile; f = Path(tempfile.mkdtemp()) / "x"; _ = f.write_bytes(b"abc")
    >>> file_digest(f)["bytes"], file_digest(f)["sha256"][:12]
    (3, 'ba7816bf8f01')
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(DIGEST_CHUNK):
            h.update(chunk)
    return {"bytes": Path(path).stat().st_size, "sha256": h.hexdigest()}


def digest_problem(path: Path, record: dict, checksum: bool = True) -> str | None:
    """What is wrong with `path` against its record {"bytes", "sha256"} (None: it matches).

    Size first (a stat); the checksum only when the size matches and `checksum` is asked for.
    """
    if not path.exists():
        return "missing"
    size = path.stat().st_size
    if "bytes" in record and size != record["bytes"]:
        return f"{size:,} bytes, its record says {record['bytes']:,} (truncated or overwritten)"
    if checksum and "sha256" in record and file_digest(path)["sha256"] != record["sha256"]:
        return "its sha256 differs from its record (the bytes were altered)"
    return None


def rebuild_hint(root: str | Path) -> str:
    """The command that rebuilds a damaged file of the stage directory `root`."""
    root = Path(root)
    try:
        stage = json.loads((root / RUN_FILE).read_text()).get("stage")
    except (OSError, ValueError, AttributeError):
        stage = None
    if stage in (STAGE_PREPARE, STAGE_SCORE, STAGE_TASKS):
        return (f"rebuild it: rerun `rpt {stage} ... --out {root}` with the options it was made with "
                f"(recorded in {root / RUN_FILE}); it redoes only the damaged shards")
    if stage == STAGE_TRAIN:
        return f"rerun `rpt train ... --out {root} --resume`"
    return f"rebuild {root} with the command that wrote it"


def read_json(path: Path, hint: str) -> Any:
    """json.load of a file this toolkit wrote; DamagedFile (naming it, with `hint`) if it does not parse."""
    try:
        return json.loads(Path(path).read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise DamagedFile(f"{path}: damaged, not valid JSON ({e}); {hint}") from None


_VERIFIED: set[tuple] = set()  # (path, size, mtime_ns) already checksummed by this process


def check_shard(root: str | Path, rel: str, manifest: dict) -> Path:
    """ROOT/rel after checking it against the manifest's record of it (size, sha256); each file
    is checksummed once per process. Manifests older than the records are not checked."""
    path = Path(root) / rel
    record = (manifest.get("files") or {}).get(rel)
    if not path.exists():
        raise DamagedFile(f"{path}: missing, though {Path(root) / MANIFEST} lists it; {rebuild_hint(root)}")
    if record is None:
        return path
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _VERIFIED:
        problem = digest_problem(path, record)
        if problem:
            raise DamagedFile(f"{path}: damaged: {problem}; {rebuild_hint(root)}")
        _VERIFIED.add(key)
    return path


def checked_shards(root: str | Path, data_dir: str, manifest: dict) -> list[Path]:
    """The shards of ROOT/data_dir in index order, each checked with `check_shard`."""
    return [check_shard(root, f"{data_dir}/{p.name}", manifest) for p in list_shards(Path(root) / data_dir)]


def read_parquet(path: str | Path, **kwargs):
    """pq.read_table, with a file that does not parse reported as DamagedFile naming it."""
    import pyarrow.parquet as pq

    with parquet_errors(path):
        return pq.read_table(path, **kwargs)


class parquet_errors:
    """`with parquet_errors(path):` around reads of one shard: pyarrow's errors become DamagedFile."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        import pyarrow as pa

        # pyarrow reports bad bytes as ArrowException, or as OSError without an errno (a corrupt
        # page); an OSError with an errno (disk full, permissions) is the system's, not damage
        damaged = isinstance(error, pa.ArrowException) or (isinstance(error, OSError) and error.errno is None)
        if damaged and not isinstance(error, DamagedFile):
            raise DamagedFile(
                f"{self.path}: damaged, cannot be read as Parquet ({error}); {rebuild_hint(self.path.parent.parent)}"
            ) from None
        return False


def read_manifest(root: Path, stage: str | None = None) -> dict:
    """The manifest of a finished stage directory, or MissingUpstream with a reason."""
    path = Path(root) / MANIFEST
    if not path.exists():
        hint = " (is the stage still running, or did it stop early? run it again to resume)" if (
            Path(root) / RUN_FILE
        ).exists() else ""
        raise MissingUpstream(f"{root}: no {MANIFEST}; not a finished rpt stage directory{hint}")
    manifest = read_json(path, rebuild_hint(root))
    if stage is not None and manifest.get("stage") != stage:
        raise MissingUpstream(f"{root}: expected the output of `rpt {stage}`, found `{manifest.get('stage')}`")
    return manifest


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
    write_json_atomic(root / RUN_FILE, {"stage": stage, "fingerprint": fp, "rpt_version": __version__, "config": identity})
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
            self.root, self.stage, config, self._own_names(), overwrite=overwrite,
            progress=(MANIFEST, f"{DONE_DIR}/*.json"), finished=MANIFEST,
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
            if record is not None and (record.get("empty") or  # a shard with no rows: its marker alone
                                       digest_problem(self.shard_path(data_dir, index), record, checksum=False) is None):
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
                problem = "its marker does not parse" if record is None else (
                    digest_problem(shard, record) or _rows_problem(shard, record))
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
