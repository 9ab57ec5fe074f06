"""Readers of a tasks directory (`rpt make-tasks` output), and what `rpt train` reads, with memory
bounded at any corpus size.

    for task in iter_tasks("out/tasks", "eval"): ...                    # one dict per task, streamed
    first = load_tasks("out/tasks", "train", limit=8)                   # the first 8, as a list
    tasks = TaskRows("out/tasks", cache="out/run/data-cache")          # the train split's tasks
    windows = DocWindows(read_manifest(tasks_dir), 128, cache=...)      # --ntp-positions all
    sampler = EpochSampler(tasks, seed=0)                               # sampler.take(256) -> rows

For training, nothing is loaded as Python objects up front. The Parquet shards are copied once (only the
columns the trainer needs, uncompressed) into Arrow IPC files under CACHE/<fingerprint>/ and
memory-mapped; a batch is a random-access `take`, and what stays resident is the OS page cache,
which the kernel can drop. A resumed run finds its cache by the upstream stage's fingerprint.
The sampler holds one permutation (4 or 8 bytes a row) and a cursor (epoch, offset).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rptdata.errors import BadOption, RptError
from rptdata.io import STAGE_PREPARE, TASK_STAGES, atomic_file, checked_shards, parquet_errors, read_manifest
from rptdata.tasks.taskdef import SPLITS, recorded_split_rule, split_of
from rpttrain.config import NEXT_TOKEN_OBJECTIVES

log = logging.getLogger(__name__)

DATA_CACHE = "data-cache"  # a run's memory-mapped copies of the tasks / documents (TaskRows, DocWindows)
TASK_COLUMNS = ["task_id", "doc_id", "context", "continuation", "boundaries", "target_id"]
# carried when the tasks have them (make-tasks' live estimate, rptdata.tasks.live; the band, for
# samples.jsonl; the unit and the text after a masked target, rptdata.tasks.units); older tasks load without
OPTIONAL_TASK_COLUMNS = ["accept_mass", "live", "band", "unit", "context_after"]


def task_shards(tasks_dir: str | Path, split: str = "train") -> list[Path]:
    """The shard files of one split of a finished `rpt make-tasks` directory, in index order
    (for readers that want pyarrow directly, e.g. a column subset of a whole split)."""
    if split not in SPLITS:
        raise BadOption(f"split must be one of {', '.join(SPLITS)}, not {split!r}")
    manifest = read_manifest(Path(tasks_dir), TASK_STAGES)  # refuses unfinished or foreign directories
    return checked_shards(tasks_dir, split, manifest)  # DamagedFile for a truncated or altered shard


def iter_tasks(tasks_dir: str | Path, split: str = "train", columns: Sequence[str] | None = None) -> Iterator[dict]:
    """Tasks of a finished `rpt make-tasks` directory, one dict per task, shard by shard.

    Memory is one record batch at a time. `columns` picks a subset of TASKS_SCHEMA.
    """
    for path in task_shards(tasks_dir, split):
        with parquet_errors(path):
            for batch in pq.ParquetFile(path).iter_batches(batch_size=1024, columns=list(columns) if columns else None):
                yield from batch.to_pylist()


def load_tasks(tasks_dir: str | Path, split: str = "train", limit: int | None = None) -> list[dict]:
    """The first `limit` tasks of a split (all with None), in shard order, as dicts."""
    if limit is not None and limit < 0:
        raise BadOption(f"limit must be 0 or more, not {limit}")
    out: list[dict] = []
    if limit == 0:
        return out
    for task in iter_tasks(tasks_dir, split):
        out.append(task)
        if limit is not None and len(out) >= limit:
            break
    return out


def mmap_shards(shards: Sequence[Path], columns: list[str], cache: Path) -> pa.Table:
    """The `columns` of the Parquet `shards` as one memory-mapped table (zero-copy chunks).

    Each shard becomes CACHE/part-NNNNN.arrow, written batch by batch (memory: one batch) and
    renamed into place, so a crash never leaves a half file that looks finished."""
    cache.mkdir(parents=True, exist_ok=True)
    tables = []
    for i, shard in enumerate(shards):
        dst = cache / f"part-{i:05d}.arrow"
        if dst.exists():
            try:
                tables.append(pa.ipc.open_file(pa.memory_map(str(dst))).read_all())
                continue
            except (pa.ArrowException, OSError):  # a damaged cache file is derived data: rebuild it
                log.warning("%s is damaged; rebuilding it from %s", dst, shard)
        with parquet_errors(shard):
            pf = pq.ParquetFile(shard)
            schema = pa.schema([pf.schema_arrow.field(c) for c in columns])
            with atomic_file(dst) as tmp, pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
                for batch in pf.iter_batches(batch_size=8192, columns=columns):
                    writer.write_batch(batch)
        tables.append(pa.ipc.open_file(pa.memory_map(str(dst))).read_all())
    if not tables:
        raise RptError(f"nothing to read: no shards for {cache.name}")
    return pa.concat_tables(tables)


def target_token(task: dict, tokenizer, exact: bool = True) -> int:
    """x_t, the token a task's context is followed by: the task's `target_id` when the policy's
    tokenizer is the tasks' (`exact`), else the first token of its continuation, tokenized.

    >>> target_token({"target_id": 7, "continuation": " x"}, tokenizer=None)
    7
    """
    target = task.get("target_id") if exact else None
    if target is None:
        target = tokenizer(task["continuation"], add_special_tokens=False)["input_ids"][0]
    return int(target)


class TaskRows:
    """The train split of a `rpt make-tasks` directory: len() and take(indices) -> list of dicts.

    Rows hold TASK_COLUMNS, plus `accept_mass` and `live` when the tasks carry them
    (`rptdata.tasks.live.predicted_zero_variance(rows, G)` then predicts a batch's dead groups),
    and `band` (what samples.jsonl records with each sample)."""

    def __init__(self, tasks_dir: str | Path, cache: str | Path):
        shards = task_shards(tasks_dir, "train")
        if not shards:
            raise RptError(f"nothing to train on: {tasks_dir} has no train shards")
        key = read_manifest(Path(tasks_dir), TASK_STAGES).get("fingerprint") or "unversioned"
        with parquet_errors(shards[0]):
            present = set(pq.read_schema(shards[0]).names)
        extra = [c for c in OPTIONAL_TASK_COLUMNS if c in present]
        # the column set is part of the cache's name: a cache made without `live` is not reused with it
        name = f"tasks-{key}" + ("-" + "-".join(extra) if extra else "")
        self.table = mmap_shards(shards, TASK_COLUMNS + extra, Path(cache) / name)

    def __len__(self) -> int:
        return self.table.num_rows

    def take(self, indices: Sequence[int]) -> list[dict]:
        return self.table.take(pa.array(np.asarray(indices, dtype=np.int64))).to_pylist()


class DocWindows:
    """Non-overlapping windows of at most `window` + 1 tokens over every training-split document
    of the prepared corpus behind a tasks directory: the data of `--ntp-positions all`. Each
    window predicts its last `len - 1` tokens.

    The split is recomputed with the tasks' own rule, so held-out documents are never trained on.
    The index is two integer arrays (document row, start); the token ids stay memory-mapped."""

    def __init__(self, tasks_manifest: dict, window: int, cache: str | Path):
        if window < 1:
            raise BadOption(f"window must be at least 1, not {window}")
        prepared = tasks_manifest.get("prepared_dir")
        if not prepared or not Path(prepared).exists():
            raise RptError(
                f"the prepared corpus of these tasks ({prepared}) is not there; --ntp-positions all needs it"
            )
        prep_manifest = read_manifest(Path(prepared), STAGE_PREPARE)
        key = prep_manifest.get("fingerprint") or "unversioned"
        self.window = window
        self.docs = mmap_shards(
            checked_shards(prepared, "docs", prep_manifest),
            ["doc_id", "token_ids", "n_tokens"],
            Path(cache) / f"docs-{key}",
        )
        rule = tasks_manifest["split"]
        keep, lengths = [], []
        for batch in self.docs.select(["doc_id", "n_tokens"]).to_batches():
            keep += [split_of(d, rule["seed"], rule["eval_fraction"]) == "train" for d in batch.column(0).to_pylist()]
            lengths.append(batch.column(1).to_numpy().astype(np.int64))
        n = np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)
        # windows start at 0, window, 2*window, ... < n - 1: ceil((n - 1) / window) of them
        counts = np.where(np.asarray(keep, dtype=bool) & (n >= 2), (n - 2) // window + 1, 0)
        self.rows = np.repeat(np.arange(len(n), dtype=np.int64), counts)
        first = np.repeat(np.cumsum(counts) - counts, counts)
        self.starts = (np.arange(len(self.rows), dtype=np.int64) - first) * window

    def __len__(self) -> int:
        return len(self.rows)

    def take(self, indices: Sequence[int]) -> list[np.ndarray]:
        idx = np.asarray(indices, dtype=np.int64)
        docs = self.docs.column("token_ids").take(pa.array(self.rows[idx]))
        out = []
        for j, start in enumerate(self.starts[idx]):
            ids = docs[j].values.to_numpy(zero_copy_only=False)
            out.append(ids[start : start + self.window + 1].astype(np.int64))
        return out


class EpochSampler:
    """Seeded epochs over a source (TaskRows, DocWindows, or a list); the cursor (epoch, offset)
    is all resume needs."""

    def __init__(self, source, seed: int, epoch: int = 0, offset: int = 0):
        if len(source) == 0:
            raise RptError("nothing to train on: the training split is empty")
        self.source, self.seed, self.epoch, self.offset = source, seed, epoch, offset
        self._order = self._permutation(epoch)

    def _permutation(self, epoch: int) -> np.ndarray:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.source))
        return order.astype(np.uint32) if len(self.source) < 2**32 else order

    def take(self, n: int) -> list:
        picked = []
        while len(picked) < n:
            if self.offset >= len(self.source):
                self.epoch, self.offset = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            k = min(n - len(picked), len(self.source) - self.offset)
            picked.extend(int(i) for i in self._order[self.offset : self.offset + k])
            self.offset += k
        if isinstance(self.source, list):
            return [self.source[i] for i in picked]
        return self.source.take(picked)

    def at_step(self, step: int) -> None:
        """The trainer's step, before its draws: epochs do not depend on it (the cursor is the state)."""

    def cursor(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset}


# ---------------------------------------------------------------------------------------------
# what a run trained on, recorded by `rpt train` (RUN/trained_on.json) for `rpt eval`'s held-out check

TRAINED_ON = "trained_on.json"


def trained_on_record(
    objective: str, ntp_positions: str, tasks_dir: str | Path, tasks_manifest: dict, started_from: dict | None = None
) -> dict:
    """What a run trains on, as JSON: the source `rpt train` reads (TaskRows: the train split's task
    rows; DocWindows: every document the tasks' split rule puts in train), the tasks it comes from,
    and the checkpoint of another run it started from (`started_from`, None for a base model).

    >>> m = {"fingerprint": "ab12", "split": {"hash": "sha256", "seed": 1, "eval_fraction": 0.25}}
    >>> r = trained_on_record("ntp", "all", "/data/tasks", m)
    >>> r["source"], r["documents"], r["split_rule"]["seed"], r["tasks_fingerprint"]
    ('doc-windows', 'train-split-documents', 1, 'ab12')
    >>> r = trained_on_record("rpt", "all", "/data/tasks", m)   # ntp_positions only matters for ntp objectives
    >>> r["source"], r["documents"], r["tasks_dir"]
    ('task-rows', 'train-split-tasks', '/data/tasks')
    """
    # as TrainConfig.on_documents, which Trainer.setup follows to pick DocWindows
    whole_documents = objective in NEXT_TOKEN_OBJECTIVES and ntp_positions == "all"
    return {
        "objective": objective,
        "task_kind": task_kind(tasks_manifest),
        # the checkpoint of another run this run started from (rpttrain.checkpoint.checkpoint_origin), or None
        "started_from": started_from,
        "source": "doc-windows" if whole_documents else "task-rows",
        "tasks_dir": str(Path(tasks_dir).resolve()),
        "tasks_fingerprint": tasks_manifest.get("fingerprint"),
        "split_rule": recorded_split_rule(tasks_manifest),
        "documents": "train-split-documents" if whole_documents else "train-split-tasks",
    }


def live_estimate_mismatch(tasks_manifest: dict, group_size: int, temperature: float) -> str | None:
    """Why a run's G or T disagrees with the ones make-tasks' live estimate used (None: they agree,
    or the tasks carry no estimate). With --min-live the tasks were filtered for other settings.

    >>> m = {"live_estimate": {"group_size": 8, "temperature": 0.8, "min_live": 0.2}}
    >>> live_estimate_mismatch(m, 8, 0.8) is None
    True
    >>> print(live_estimate_mismatch(m, 4, 0.8)[:88])
    make-tasks estimated live groups for G=8 (this run: 4): --min-live 0.2 dropped positions
    """
    est = tasks_manifest.get("live_estimate") or {}
    diffs = []
    if est.get("group_size") not in (None, group_size):
        diffs.append(f"G={est['group_size']} (this run: {group_size})")
    if est.get("temperature") is not None and not math.isclose(float(est["temperature"]), temperature):
        diffs.append(f"T={est['temperature']:g} (this run: {temperature:g})")
    if not diffs:
        return None
    what = (
        f"--min-live {est['min_live']:g} dropped positions"
        if est.get("min_live") is not None
        else "the predicted live share (predicted_zero_variance in the metrics) is"
    )
    return (
        f"make-tasks estimated live groups for {', '.join(diffs)}: {what} for groups of another size or "
        f"temperature; rebuild the tasks with --group-size {group_size} --temperature {temperature:g} to match"
    )


# ---------------------------------------------------------------------------------------------
# what kind of tasks a directory holds, and the rewards and prompt formats that fit them

NEXT_TOKEN, ANSWER = "next-token", "answer"


def task_kind(tasks_manifest: dict) -> str:
    """ "answer" for `rpt answer-tasks` output (a problem and its final answer), else "next-token"
    (`rpt make-tasks`: a context and its continuation's tokens).

    >>> task_kind({"stage": "answer-tasks", "task_kind": "answer"}), task_kind({"stage": "make-tasks"})
    ('answer', 'next-token')
    """
    return tasks_manifest.get("task_kind") or NEXT_TOKEN


def task_unit(tasks_manifest: dict) -> str | None:
    """What a `rpt make-tasks` directory's tasks predict: token, sentence, masked-sentence or span
    (rptdata.tasks.units); "token" for directories made before units; None for answer tasks.

    >>> task_unit({"stage": "make-tasks"}), task_unit({"unit": "span"}), task_unit({"task_kind": "answer"})
    ('token', 'span', None)
    """
    if task_kind(tasks_manifest) == ANSWER:
        return None
    return tasks_manifest.get("unit") or "token"


def check_task_fit(
    tasks_manifest: dict, reward: str, prompt_template: str | None = None, objective: str = "rpt"
) -> None:
    """Refuse a reward, prompt format or objective that cannot score these tasks, by name: answer
    tasks are scored by the math reward in an answer format; make-tasks' tasks by the rewards and
    formats of their unit (`rpttrain.reward.UNIT_REWARDS`, `rpttrain.prompts.UNIT_FORMATS`).

    >>> check_task_fit({"task_kind": "answer"}, "math", "answer")
    >>> check_task_fit({"task_kind": "answer"}, "prefix")
    Traceback (most recent call last):
    rptdata.errors.BadOption: --reward prefix cannot score answer tasks (rpt answer-tasks): they hold a final answer, checked with --reward math
    >>> check_task_fit({"unit": "span"}, "exact", "masked-span")
    >>> check_task_fit({"unit": "span"}, "prefix", "masked-span")
    Traceback (most recent call last):
    rptdata.errors.BadOption: --reward prefix does not fit span tasks (rpt make-tasks --unit); use --reward exact, exact-nocase or judge
    """
    from rpttrain.prompts import ANSWER_FORMATS, PROMPT_FORMATS, UNIT_FORMATS, load_prompt_format
    from rpttrain.reward import ANSWER_REWARDS, UNIT_REWARDS

    answer = task_kind(tasks_manifest) == ANSWER
    if answer and objective in NEXT_TOKEN_OBJECTIVES:
        raise BadOption(
            f"--objective {objective} trains next-token prediction on next-token tasks; answer tasks "
            "(rpt answer-tasks) are trained with --objective rpt --reward math"
        )
    if answer and reward not in ANSWER_REWARDS:
        raise BadOption(
            f"--reward {reward} cannot score answer tasks (rpt answer-tasks): they hold a final answer, "
            f"checked with --reward {' | '.join(ANSWER_REWARDS)}"
        )
    if not answer and reward in ANSWER_REWARDS:
        raise BadOption(
            f"--reward {reward} checks final answers of answer tasks (rpt answer-tasks); these are next-token "
            f"tasks (rpt make-tasks): use --reward {_either(UNIT_REWARDS[task_unit(tasks_manifest) or 'token'])}"
        )
    unit = task_unit(tasks_manifest)
    if unit is not None:
        _check_unit_fit(unit, reward, prompt_template, UNIT_REWARDS, UNIT_FORMATS, load_prompt_format)
    if prompt_template in PROMPT_FORMATS and (prompt_template in ANSWER_FORMATS) != answer:
        fits = ", ".join(ANSWER_FORMATS) if answer else ", ".join(f for f in PROMPT_FORMATS if f not in ANSWER_FORMATS)
        raise BadOption(
            f"--prompt-template {prompt_template} does not fit {'answer' if answer else 'next-token'} tasks; "
            f"use {fits} (or a template file)"
        )


def _either(names) -> str:
    """
    >>> _either(["a"]), _either(["a", "b", "c"])
    ('a', 'a, b or c')
    """
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def _check_unit_fit(unit, reward, prompt_template, unit_rewards, unit_formats, load_format) -> None:
    rewards = unit_rewards.get(unit)
    if rewards is None:
        raise BadOption(f"these tasks predict a unit this version does not know ({unit!r}); update rpt")
    if reward not in rewards:
        raise BadOption(
            f"--reward {reward} does not fit {unit} tasks (rpt make-tasks --unit); use --reward {_either(rewards)}"
        )
    if prompt_template is None:
        return
    formats = unit_formats[unit]
    masked = unit in ("masked-sentence", "span")
    if prompt_template in unit_formats["token"] + tuple(f for fs in unit_formats.values() for f in fs):
        if prompt_template not in formats:
            raise BadOption(
                f"--prompt-template {prompt_template} does not fit {unit} tasks; use {', '.join(formats)} "
                "(or a template file)"
            )
    elif load_format(prompt_template).masked != masked:  # a template file: {context_after} iff masked
        need = "holds {context_after} (the text after the mask)" if masked else "has no {context_after}"
        raise BadOption(f"--prompt-template {prompt_template}: a template for {unit} tasks {need}")


def open_tasks(config) -> dict:
    """The tasks manifest of a training run, read once (a finished make-tasks or answer-tasks
    directory): refused when the run's reward, prompt format or objective cannot score these tasks
    (`check_task_fit`), with a warning when an RPT run's G or T differs from what make-tasks
    estimated live groups for. Every training backend opens its tasks here."""
    manifest = read_manifest(Path(config.tasks_dir), TASK_STAGES)
    check_task_fit(manifest, config.reward, config.prompt_template, config.objective)
    mismatch = live_estimate_mismatch(manifest, config.group_size, config.temperature)
    if mismatch and config.samples_rollouts:
        log.warning(mismatch)
    return manifest


def policy_tokenizer(config, tasks_manifest: dict):
    """The policy's tokenizer (`config.model`), refused (`rptdata.models.check_tokenizer`) when the
    tasks were built with another vocabulary, unless --allow-tokenizer-mismatch: their continuation
    boundaries would not be the policy's tokens. Every training backend loads it here."""
    from rptdata.models import check_tokenizer, load_tokenizer, model_name, vocab_hash

    tokenizer = load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)
    check_tokenizer(
        tasks_manifest.get("tokenizer"),
        {"name": model_name(config.model), "vocab_hash": vocab_hash(tokenizer)},
        built=f"the tasks in {config.tasks_dir} were built",
        user="the policy",
        harm="the continuation boundaries would not be the policy's tokens",
        fix="Rebuild the tasks with the policy's tokenizer (rpt prepare --tokenizer, then score-entropy and make-tasks)",
        allow="--allow-tokenizer-mismatch to score predictions on the corpus tokenizer's boundaries anyway",
        allowed=config.allow_tokenizer_mismatch,
    )
    return tokenizer
