"""Files the stages write and read: atomic writes, checked reads, digests, manifests.

    with atomic_file(path) as tmp: ...        # write tmp; renamed onto path when the block succeeds
    with atomic_folder(folder) as tmp: ...    # the same for a folder (checkpoints, model caches)
    write_json_atomic / write_text_atomic / write_parquet_atomic / truncate_jsonl
    read_manifest(root, stage)                # a finished stage's manifest, or MissingUpstream
    check_shard(root, rel, manifest)          # size + sha256 against the producer's record
    read_parquet(path)                        # pyarrow's errors become DamagedFile naming the file

Every write-then-rename of the toolkit goes through this module: readers see the old file or the
whole new one, never a part, and a write that fails (disk full) leaves no temporary name behind.
Temporary names are `NAME.tmp-PID`; `rptdata.stage` counts them as the run's own files.

The directory layout every stage shares, and its rules (refuse / resume / overwrite), are in
`rptdata.stage`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rptdata import faults
from rptdata.errors import DamagedFile, MissingUpstream

MANIFEST = "manifest.json"
RUN_FILE = "run.json"
DONE_DIR = "done"

# The stage names: `rpt <name>`, and the "stage" field of every run.json and manifest.json.
STAGE_PREPARE = "prepare"
STAGE_SCORE = "score-entropy"
STAGE_TASKS = "make-tasks"
STAGE_ANSWER_TASKS = "answer-tasks"
# the stages whose output is a tasks directory (train/ and eval/ task shards) that train, probe,
# eval and export-tasks read; the manifest's "task_kind" says which (rpttrain.data.task_kind)
TASK_STAGES = (STAGE_TASKS, STAGE_ANSWER_TASKS)
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


@contextmanager
def atomic_folder(folder: Path, fault: str | None = None, replace: bool = True) -> Iterator[Path]:
    """Fill the yielded temporary folder beside `folder`; when the block ends without an error it
    becomes `folder`. A failed block leaves nothing behind. `replace`: an existing `folder` is
    removed first; else it is kept and ours dropped (a cache another process filled meanwhile is
    as good as ours). `fault`: the RPT_FAULT point hit just before the rename."""
    folder = Path(folder)
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if fault:
            faults.hit(fault, tmp)
        if replace and folder.exists():
            shutil.rmtree(folder)
        try:
            os.replace(tmp, folder)
        except OSError:
            if replace or not folder.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json_atomic(path: Path, obj: Any) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, fault="json-tmp") as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
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
    if stage == STAGE_ANSWER_TASKS:
        return f"rebuild it: rerun `rpt {stage} ... --out {root} --overwrite` with the options it was made with"
    if stage in (STAGE_PREPARE, STAGE_SCORE, STAGE_TASKS):
        return (
            f"rebuild it: rerun `rpt {stage} ... --out {root}` with the options it was made with "
            f"(recorded in {root / RUN_FILE}); it redoes only the damaged shards"
        )
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


def read_manifest(root: Path, stage: str | tuple[str, ...] | None = None) -> dict:
    """The manifest of a finished stage directory, or MissingUpstream with a reason. `stage`: the
    stage (or stages, e.g. TASK_STAGES) whose output it must be."""
    path = Path(root) / MANIFEST
    if not path.exists():
        hint = (
            " (is the stage still running, or did it stop early? run it again to resume)"
            if (Path(root) / RUN_FILE).exists()
            else ""
        )
        raise MissingUpstream(f"{root}: no {MANIFEST}; not a finished rpt stage directory{hint}")
    manifest = read_json(path, rebuild_hint(root))
    stages = (stage,) if isinstance(stage, str) else stage
    if stages is not None and manifest.get("stage") not in stages:
        wanted = " or ".join(f"`rpt {s}`" for s in stages)
        raise MissingUpstream(f"{root}: expected the output of {wanted}, found `{manifest.get('stage')}`")
    return manifest
