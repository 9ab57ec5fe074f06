"""`rpt export-tasks`: RPT tasks -> parquet datasets that verl and TRL train on directly.

    run_export_tasks(ExportConfig(tasks_dir="out/tasks", out="out/verl", format="verl")) -> manifest

Output (one file per split, streamed shard by shard through a ParquetWriter, so memory is one
record batch, and renamed into place when complete):
    OUT/train.parquet   rows of `task_to_verl_row` / `task_to_trl_row` (rpttrain/integrations)
    OUT/eval.parquet    the held-out documents' tasks (with --split eval or both)
    OUT/run.json        written first: these settings (a rerun after a crash redoes the export)
    OUT/manifest.json   written last: source tasks, format, prompt template, reward, row counts,
                        and for verl the two overrides that point verl 0.9.1 at the rpt reward
                        (verl_overrides: reward.custom_reward_function.path/name)

The columns are fixed per (format, prompt template, tokenizer), see docs/tasks.md; every row is
checked against them, so a change in the integration modules cannot drop a column silently.

Left out on purpose: resuming (an export is a fast, single pass; rerun it), filtering by band or
length (filter the tasks, or use verl's data.filter_overlong_prompts), and shuffling (both
trainers shuffle).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from rptdata import faults
from rptdata.errors import BadOption
from rptdata.io import (
    MANIFEST,
    STAGE_EXPORT,
    TASK_STAGES,
    atomic_file,
    checked_shards,
    file_digest,
    parquet_errors,
    read_manifest,
    write_json_atomic,
)
from rptdata.stage import claim_run_dir
from rptdata.tasks.taskdef import SPLITS
from rpttrain.data import check_task_fit
from rpttrain.prompts import PromptFormat, load_prompt_format
from rpttrain.reward import get_reward_fn

log = logging.getLogger(__name__)

__all__ = ["EXPORT_FORMATS", "ExportConfig", "export_schema", "run_export_tasks"]

STAGE = STAGE_EXPORT
EXPORT_FORMATS = ("verl", "trl")
SPLIT_CHOICES = ("train", "eval", "both")
BATCH_ROWS = 1024

_MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))


def export_schema(format: str, fmt: PromptFormat, with_prompt_text: bool) -> pa.Schema:
    """The columns of an export: verl's RLHF parquet layout, or TRL's prompt + reward columns.

    `with_prompt_text`: a tokenizer was given (TRL), or a tokenizer was given or the format is raw
    (verl); then the exact prompt string is stored too (see the integration modules).

    >>> from rpttrain.prompts import PROMPT_FORMATS
    >>> export_schema("trl", PROMPT_FORMATS["continuation"], False).names
    ['prompt', 'continuation', 'boundaries', 'reward', 'format', 'task_id']
    """
    if format == "verl":
        extra = [
            ("task_id", pa.string()),
            ("doc_id", pa.string()),
            ("pos", pa.int64()),
            ("entropy", pa.float64()),
            ("band", pa.string()),
            ("format", pa.string()),
            ("raw_prompt", pa.bool_()),
        ]
        if with_prompt_text or not fmt.uses_chat:
            extra.append(("prompt_text", pa.string()))
        return pa.schema(
            [
                ("data_source", pa.string()),
                ("prompt", _MESSAGES),
                ("ability", pa.string()),
                ("reward_model", pa.struct([("style", pa.string()), ("ground_truth", pa.string())])),
                ("extra_info", pa.struct(extra)),
            ]
        )
    if format == "trl":
        fields = [
            ("prompt", _MESSAGES if fmt.uses_chat else pa.string()),
            ("continuation", pa.string()),
            ("boundaries", pa.list_(pa.int32())),
            ("reward", pa.string()),
            ("format", pa.string()),
            ("task_id", pa.string()),
        ]
        if with_prompt_text:
            fields.append(("prompt_text", pa.string()))
        return pa.schema(fields)
    raise BadOption(f"unknown export format {format!r}; choose one of: {', '.join(EXPORT_FORMATS)}")


@dataclass(frozen=True)
class ExportConfig:
    """Options of `rpt export-tasks`.

    Fields:
        tasks_dir: a finished `rpt make-tasks` directory.
        out: the output folder (train.parquet / eval.parquet / manifest.json).
        format: "verl" or "trl".
        split: "train", "eval" or "both".
        prompt_template: v0, v2, v6, continuation, or a template file holding {context} once.
        reward: the reward named in each row ("prefix", "first-token", "exact", "exact-nocase", "math"); it must fit
            the tasks' unit (`rpttrain.data.check_task_fit`).
        tokenizer: a model spec; when given, the exact prompt string (its chat template) is
            stored as `prompt_text`, handy for length filtering.
        overwrite: replace an earlier export in `out`.
        progress: show a progress bar.
    """

    tasks_dir: str
    out: str
    format: str
    split: str = "both"
    prompt_template: str = "v0"
    reward: str = "prefix"
    tokenizer: str | None = None
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self):
        if self.format not in EXPORT_FORMATS:
            raise BadOption(f"--format must be one of {', '.join(EXPORT_FORMATS)}, not {self.format!r}")
        if self.split not in SPLIT_CHOICES:
            raise BadOption(f"--split must be one of {', '.join(SPLIT_CHOICES)}, not {self.split!r}")
        get_reward_fn(self.reward)  # ValueError naming the choices

    def splits(self) -> tuple[str, ...]:
        return SPLITS if self.split == "both" else (self.split,)


def _row_fn(format: str) -> Callable[..., dict]:
    if format == "verl":
        from rpttrain.integrations.verl import task_to_verl_row

        return task_to_verl_row
    from rpttrain.integrations.trl import task_to_trl_row

    return task_to_trl_row


def _check_keys(row: dict, schema: pa.Schema | pa.StructType, where: str = "") -> None:
    """Raise when a row's keys (nested structs included) differ from the export columns."""
    fields = list(schema)
    names = [f.name for f in fields]
    if set(row) != set(names):
        raise AssertionError(
            f"export row{where} has keys {sorted(row)}, the export columns are {sorted(names)}; "
            "update rpttrain/export.py:export_schema with the integration module"
        )
    for f in fields:
        if pa.types.is_struct(f.type) and isinstance(row[f.name], dict):
            _check_keys(row[f.name], f.type, f"{where}.{f.name}")


def _export_split(paths: list[Path], dest: Path, schema: pa.Schema, to_row: Callable[[dict], dict], bar) -> int:
    rows_written = 0
    with atomic_file(dest) as tmp, pq.ParquetWriter(tmp, schema) as writer:
        for path in paths:
            with parquet_errors(path):
                for batch in pq.ParquetFile(path).iter_batches(batch_size=BATCH_ROWS):
                    rows = [to_row(task) for task in batch.to_pylist()]
                    if rows:
                        _check_keys(rows[0], schema)
                    writer.write_table(pa.Table.from_pylist(rows, schema=schema))
                    rows_written += len(rows)
                    bar.update(len(rows))
                    faults.hit("export-batch", tmp)
    return rows_written


def run_export_tasks(config: ExportConfig) -> dict:
    """Export the tasks; returns the manifest written to OUT/manifest.json."""
    started = time.time()
    tasks_dir = Path(config.tasks_dir)
    tm = read_manifest(tasks_dir, TASK_STAGES)
    check_task_fit(tm, config.reward, config.prompt_template)
    fmt = load_prompt_format(config.prompt_template)
    tokenizer = None
    if config.tokenizer is not None:
        from rptdata.models import load_tokenizer

        tokenizer = load_tokenizer(config.tokenizer)

    out = Path(config.out)
    # the rule every stage shares (`rptdata.stage.claim_run_dir`): run.json first; an export of these
    # settings that stopped before its manifest is redone, a finished one is kept, another refused
    identity = {
        "tasks": tm.get("fingerprint"),
        **{k: v for k, v in config.__dict__.items() if k not in ("out", "overwrite", "progress")},
    }
    own = tuple(f"{s}.parquet" for s in SPLITS) + (MANIFEST,)
    if (
        claim_run_dir(out, STAGE, identity, own, overwrite=config.overwrite, progress=(MANIFEST,), finished=MANIFEST)
        == "done"
    ):
        log.info("%s is already complete; nothing to do", out)
        return read_manifest(out, STAGE)
    for name in own:  # what a stopped run left: redone from scratch
        (out / name).unlink(missing_ok=True)
    faults.hit("begin")

    schema = export_schema(config.format, fmt, tokenizer is not None)
    row_fn = _row_fn(config.format)

    def to_row(task: dict) -> dict:
        return row_fn(task, fmt, tokenizer=tokenizer, reward=config.reward)

    from tqdm import tqdm

    counts, files = {}, {}
    with tqdm(desc="export-tasks", unit=" rows", disable=not config.progress, dynamic_ncols=True) as bar:
        for split in config.splits():
            dest = out / f"{split}.parquet"
            counts[split] = _export_split(checked_shards(tasks_dir, split, tm), dest, schema, to_row, bar)
            files[split] = str(dest.resolve())
            expected = tm["counts"]["tasks"][split]
            if counts[split] != expected:  # an internal invariant: every task becomes one row
                raise AssertionError(f"{split}: exported {counts[split]} rows, the tasks manifest counts {expected}")

    manifest: dict[str, Any] = {
        "stage": STAGE,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "tasks_dir": str(tasks_dir.resolve()),
        "tasks_fingerprint": tm.get("fingerprint"),
        "tokenizer": tm.get("tokenizer"),
        "format": config.format,
        "prompt_template": fmt.name,
        "reward": config.reward,
        "render_tokenizer": config.tokenizer,
        "files": files,
        "rows": counts,
        "checksums": {split: file_digest(path) for split, path in files.items()},
        "schema": {f.name: str(f.type) for f in schema},
        "seconds": round(time.time() - started, 2),
    }
    if config.format == "verl":
        import rpttrain.integrations.verl as verl_integration

        # verl 0.9.1's main_ppo reads the key under `reward.`; a top-level one is silently ignored
        path = Path(verl_integration.__file__).resolve()
        manifest["verl_overrides"] = [
            f"reward.custom_reward_function.path={path}",
            "reward.custom_reward_function.name=compute_score",
        ]
    else:
        manifest["reward_function"] = "rpttrain.integrations.trl.rpt_reward"
    write_json_atomic(out / MANIFEST, manifest)
    return manifest
