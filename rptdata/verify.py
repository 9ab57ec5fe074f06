"""`rpt verify DIR`: check what a stage wrote, without running anything else.

    report = verify_dir("out/scored")              # sizes and sha256 of every shard vs its marker
    report = verify_dir("out/scored", deep=True)   # + every shard decoded, its rows vs its marker's
    report["problems"]                             # [{"file", "problem"}], empty when clean

It reads the records the stages keep (rptdata/stage.py: completion markers, manifest["files"];
rpttrain/checkpoint.py: state.json["files"]; export-tasks' manifest["checksums"]) and checks:
  data stages (prepare, score-entropy, make-tasks): manifest.json and every marker parse; each
      marker's shard exists with its size and sha256; the manifest's "files" equal the markers;
      a shard on disk without a marker (an unfinished shard) is reported too;
  a train run: config.yaml parses; every checkpoint's files match its state.json;
  an export: its manifest parses; each file matches its recorded size and sha256.
It never repairs: rerunning the producing stage does (it redoes only the damaged shards).
"""

from __future__ import annotations

import json
from pathlib import Path

from rptdata.errors import DamagedFile, RptError
from rptdata.io import (
    DONE_DIR,
    MANIFEST,
    RUN_FILE,
    STAGE_ANSWER_TASKS,
    STAGE_EXPORT,
    STAGE_PREPARE,
    STAGE_SCORE,
    STAGE_TASKS,
    digest_problem,
    list_shards,
    parquet_errors,
    rebuild_hint,
)

DATA_STAGES = (STAGE_PREPARE, STAGE_SCORE, STAGE_TASKS, STAGE_ANSWER_TASKS)
# rpttrain.checkpoint's names, repeated so that verifying needs no torch
CHECKPOINTS, STATE_FILE = "checkpoints", "state.json"


def verify_dir(root: str | Path, deep: bool = False) -> dict:
    """{"dir", "stage", "checked" (files), "problems": [{"file", "problem"}], "rebuild"} for `root`."""
    root = Path(root)
    if not root.is_dir():
        raise RptError(f"{root}: not a directory")
    stage = _stage_of(root)
    problems: list[dict] = []
    if stage in DATA_STAGES:
        checked = _verify_stage(root, deep, problems)
        rebuild = rebuild_hint(root)
    elif stage == STAGE_EXPORT:
        checked = _verify_export(root, deep, problems)
        rebuild = f"rerun `rpt export-tasks ... --out {root} --overwrite`"
    elif (root / "config.yaml").exists() or (root / "checkpoints").is_dir():
        stage = "train"
        checked = _verify_run(root, problems)
        rebuild = "remove a damaged checkpoint folder; `rpt train ... --resume` continues from the one before"
    else:
        raise RptError(f"{root}: not an rpt stage directory (no {RUN_FILE}, {MANIFEST} or checkpoints/)")
    return {"dir": str(root), "stage": stage, "checked": checked, "problems": problems, "rebuild": rebuild}


def _stage_of(root: Path) -> str | None:
    for name in (RUN_FILE, MANIFEST):
        try:
            return json.loads((root / name).read_text()).get("stage")
        except (OSError, ValueError, AttributeError):
            continue
    return None


def _load(path: Path, problems: list[dict]) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        problems.append({"file": str(path), "problem": f"does not parse ({e})"})
        return None
    return data if isinstance(data, dict) else None


def _verify_stage(root: Path, deep: bool, problems: list[dict]) -> int:
    manifest = _load(root / MANIFEST, problems)
    if manifest is None and not (root / MANIFEST).exists():
        problems.append({"file": str(root / MANIFEST), "problem": "missing: the stage has not finished"})
    records: dict[str, dict] = {}
    checked = 0
    for marker in sorted((root / DONE_DIR).glob("*.json")):
        record = _load(marker, problems)
        checked += 1
        if record is None or "shard" not in record:  # unparsable (reported), or an empty shard's marker alone
            continue
        data_dir = marker.stem.rsplit("-", 1)[0]
        rel = f"{data_dir}/{record['shard']}"
        records[rel] = record
        problem = digest_problem(root / rel, record)
        if problem is None and deep:
            problem = _rows_problem(root / rel, record.get("rows"))
        checked += 1
        if problem:
            problems.append({"file": str(root / rel), "problem": problem})
    for data_dir in sorted(
        {rel.split("/")[0] for rel in records} | {k.split("/")[0] for k in (manifest or {}).get("files", {})}
    ):
        for shard in list_shards(root / data_dir):
            if f"{data_dir}/{shard.name}" not in records:
                problems.append({"file": str(shard), "problem": "no completion marker (an unfinished shard)"})
    if manifest is not None and "files" in manifest:
        recorded = manifest["files"]
        for rel in sorted(set(recorded) ^ set(records)):
            where = (
                "the manifest lists it but no marker does"
                if rel in recorded
                else "a marker lists it but the manifest does not"
            )
            problems.append({"file": str(root / rel), "problem": where})
        for rel in sorted(set(recorded) & set(records)):
            if any(recorded[rel].get(k) != records[rel].get(k) for k in ("rows", "bytes", "sha256")):
                problems.append({"file": str(root / rel), "problem": "its marker and the manifest record differ"})
    return checked + (manifest is not None)


def _rows_problem(path: Path, rows: int | None) -> str | None:
    """--deep: decode the whole shard and compare its rows with the marker's."""
    import pyarrow.parquet as pq

    try:
        with parquet_errors(path):
            n = pq.read_table(path).num_rows
    except DamagedFile:
        return "cannot be read as Parquet"
    if rows is not None and n != rows:
        return f"{n} rows, its marker says {rows}"
    return None


def _verify_export(root: Path, deep: bool, problems: list[dict]) -> int:
    manifest = _load(root / MANIFEST, problems) or {}
    checked = 1
    for split, name in (manifest.get("files") or {}).items():
        path = root / Path(name).name
        problem = digest_problem(path, (manifest.get("checksums") or {}).get(split, {}))
        if problem is None and deep:
            problem = _rows_problem(path, (manifest.get("rows") or {}).get(split))
        checked += 1
        if problem:
            problems.append({"file": str(path), "problem": problem})
    return checked


def _verify_run(root: Path, problems: list[dict]) -> int:
    import yaml

    checked = 0
    config = root / "config.yaml"
    if config.exists():
        checked += 1
        try:
            yaml.safe_load(config.read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            problems.append({"file": str(config), "problem": f"does not parse ({e})"})
    folders = sorted(p for p in (root / CHECKPOINTS).glob("step-*") if p.is_dir() and "." not in p.name)
    for folder in folders:
        state = _load(folder / STATE_FILE, problems)
        checked += 1
        if state is None:
            if not (folder / STATE_FILE).exists():
                problems.append({"file": str(folder / STATE_FILE), "problem": "missing: an incomplete checkpoint"})
            continue
        for name, record in (state.get("files") or {}).items():
            checked += 1
            problem = digest_problem(folder / name, record)
            if problem:
                problems.append({"file": str(folder / name), "problem": problem})
    return checked
