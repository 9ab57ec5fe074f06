"""`rpt prepare`: corpus -> cleaned, tokenized document shards with exact byte spans.

    run_prepare(PrepareConfig(inputs=("builtin:champ",), out="out/prep")) -> manifest dict

Output (see docs/schemas.md):
    OUT/docs/part-NNNNN.parquet   doc_id, source, text, token_ids, token_end_bytes, n_tokens
    OUT/rejects.jsonl             bad records, with --skip-bad
    OUT/manifest.json             tokenizer + vocab hash, inputs, options, shards, counts

Per record: build the text (field or template), normalize it the way the tokenizer will
(`text` stores the normalized form, so the byte spans are exact against it), drop empty ones,
`--min-chars`, `--dedupe` (exact, by content hash), then tokenize in batches without special
tokens. Every record read is accounted for: read = written + rejected + dropped.

Shards and workers: all inputs in order form one record stream; shard i holds the documents
kept from records [i*shard_docs, (i+1)*shard_docs), so a shard cuts through files and a large
file through shards, and its name never depends on who made it. Each worker first indexes the
inputs (`sources.index_source`: counts records, a line scan of each `.jsonl`, and notes where
each shard's first record lies), then takes shards i, i+n, ... (`worker_split`, the split
score-entropy uses; `--num-workers/--worker-index` or torchrun's RANK/WORLD_SIZE) and seeks to
them. `processes=N` runs N such workers here (forked; worker w's share split again);
`executor="ray"` runs every shard as a task on a Ray cluster (`rptdata.executors`, docs/ray.md). A shard's
completion marker holds its full accounting (read, written, rejected and dropped by reason, its
rejects); the worker that finds every marker present writes rejects.jsonl and the manifest from
them (last finisher; running any worker again once all are done writes it too), so
read = written + rejected + dropped holds summed over workers.

Resume: a rerun (of any worker) only processes its shards that have no completion marker.
`--dedupe` keeps the first copy in stream order, which needs the whole stream in one process:
it is refused with several workers or processes; a resumed dedupe run re-reads the texts of the
finished shards into its set of seen documents.

Speed: the tokenizer is `tokenizers` alone when that is what transformers loads
(`models.load_plain_tokenizer`: no transformers or torch import once a folder was checked), JSON lines go through orjson,
and each batch is encoded on a second thread while the next records are read (not in a process
meant to take one core: TOKENIZERS_PARALLELISM=false). `make bench-prepare` measures it.

Left out on purpose: fuzzy dedup, language or quality filters (use datatrove upstream), and
dedupe across workers.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

from rptdata.doc_table import DOCS_SCHEMA, docs_table
from rptdata.errors import BadInput, BadOption
from rptdata.executors import Executor, run_units
from rptdata.io import (
    STAGE_PREPARE,
    atomic_file,
    list_shards,
    read_manifest,
    read_parquet,
    shard_name,
    write_json_atomic,
)
from rptdata.models import DEFAULT_MODEL, load_plain_tokenizer, model_name, vocab_hash
from rptdata.sources import TextBuilder, expand_inputs
from rptdata.spans import ByteSpanTokenizer
from rptdata.stage import StageDir, run_stage, worker_from_env
from rptdata.stream import RecordCounts, RecordStream, accept_record, content_key, plan_units

log = logging.getLogger(__name__)

DOCS_DIR = "docs"


@dataclass(frozen=True)
class PrepareConfig:
    """Options of `rpt prepare`; see `rpt prepare --help` for each."""

    inputs: tuple[str, ...]
    out: str
    tokenizer: str = DEFAULT_MODEL
    text_field: str | None = None
    template: str | None = None
    split: str = "train"
    max_docs: int | None = None
    dedupe: bool = False
    min_chars: int = 1
    shard_docs: int = 10_000
    batch_docs: int = 512
    skip_bad: bool = False
    overwrite: bool = False
    trust_remote_code: bool = False
    progress: bool = True
    num_workers: int | None = None  # None: torchrun's WORLD_SIZE, else 1
    worker_index: int | None = None  # None: torchrun's RANK, else 0
    processes: int = 1  # local processes, each a share of this worker's share
    allow_empty: bool = False  # an input that yields no document is an error unless this is set
    executor: str = "local"  # local | ray (rptdata.executors)
    ray_address: str | None = None

    def __post_init__(self):
        if self.processes < 1:
            raise BadOption("--processes must be at least 1")
        Executor(self.executor, self.ray_address).refuse(
            **{
                "--processes": self.processes if self.processes > 1 else None,
                "--num-workers": self.num_workers,
                "--worker-index": self.worker_index,
                "--dedupe": self.dedupe,
            }
        )
        if self.dedupe:
            _refuse_dedupe_across(self.num_workers or 1, self.processes)
        if not self.inputs:
            raise BadOption("give at least one input (file, folder, glob, builtin:champ or dataset id)")
        if self.text_field and self.template:
            raise BadOption("give either --text-field or --template, not both")
        if self.shard_docs < 1 or self.batch_docs < 1:
            raise BadOption("--shard-docs and --batch-docs must be at least 1")
        if self.max_docs is not None and self.max_docs < 1:
            raise BadOption("--max-docs must be at least 1")
        if self.min_chars < 1:
            raise BadOption("--min-chars must be at least 1 (empty documents are always dropped)")

    def identity(self) -> dict:
        """The options that decide the output (not where it goes or how it is shown)."""
        d = asdict(self)
        for k in (
            "out",
            "overwrite",
            "progress",
            "inputs",
            "batch_docs",
            "num_workers",
            "worker_index",
            "processes",
            "allow_empty",
            "executor",
            "ray_address",
        ):
            d.pop(k)
        return d


def run_prepare(config: PrepareConfig) -> dict:
    """Prepare this worker's share of the corpus; returns the manifest once every shard is done
    (whichever worker finishes last writes it), else a progress summary with "complete": False.
    With `processes > 1`, runs that many workers here (each a share of this worker's share); with
    `executor="ray"`, every shard as a task on a Ray cluster (`rptdata.executors`)."""
    executor = Executor(config.executor, config.ray_address)
    worker, workers = worker_from_env(config.num_workers, config.worker_index)
    executor.refuse(**{"torchrun's WORLD_SIZE": workers if workers > 1 else None})
    executor.check()  # a cluster address that does not answer fails now, before anything is written
    if config.dedupe:
        _refuse_dedupe_across(workers, config.processes)  # again: torchrun's WORLD_SIZE counts too
    tokenizer = load_plain_tokenizer(config.tokenizer, trust_remote_code=config.trust_remote_code)
    sources = expand_inputs(list(config.inputs))
    TextBuilder(config.text_field, config.template)  # validates the template early
    tokenizer_info = {
        "name": model_name(config.tokenizer),
        "spec": config.tokenizer,
        "vocab_hash": vocab_hash(tokenizer),
    }
    stage = StageDir(Path(config.out), STAGE_PREPARE, [DOCS_DIR])
    state = stage.begin(
        {"inputs": [s.fingerprint() for s in sources], "options": config.identity(), "tokenizer": tokenizer_info},
        overwrite=config.overwrite,
    )
    if state == "done":
        log.info("%s is already complete; nothing to do", config.out)
        return read_manifest(config.out, STAGE_PREPARE)
    if config.processes > 1:  # each local process runs this function on its share; the last one done finishes
        total = _run_pool(config, worker, workers)
        units = plan_units(total, config.shard_docs)

        def run(todo: list[int]) -> None:  # the pool has run this worker's shards already
            pass
    else:
        records = RecordStream(
            sources, TextBuilder(config.text_field, config.template), config.split, config.shard_docs, config.max_docs
        )
        total, units = records.total, plan_units(records.total, config.shard_docs)

        def run(todo: list[int]) -> None:
            _run_units(config, tokenizer, records, units, todo, stage, executor)

    return run_stage(
        stage,
        range(len(units)),
        worker=worker,
        workers=workers,
        done=lambda: stage.done_shards(DOCS_DIR),
        run=run,
        finish=lambda done: _finish(stage, config, sources, tokenizer_info, total, done),
        counts=PROGRESS_COUNTS,
        extra={"records_total": total},
    )


# this worker's progress summary: its name -> the marker's key
PROGRESS_COUNTS = {"documents_read": "read", "documents_written": "documents", "tokens": "tokens"}


def _refuse_dedupe_across(workers: int, processes: int) -> None:
    if workers * processes > 1:
        raise BadOption(
            f"--dedupe needs one process ({workers} worker(s) x {processes} process(es) given): exact dedupe "
            "keeps the first copy in corpus order, which a worker cannot see in another worker's share. "
            "Prepare with one process, or without --dedupe (and dedupe upstream)."
        )


def _run_pool(config: PrepareConfig, worker: int, workers: int) -> int:
    """`processes` local workers, worker*P + p of workers*P: the same split as that many machines."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from dataclasses import replace

    n = config.processes
    jobs = [
        replace(
            config, processes=1, num_workers=workers * n, worker_index=worker * n + p, progress=False, overwrite=False
        )
        for p in range(n)
    ]
    # fork where there is one: a spawned worker spends seconds importing transformers and torch
    # again; the tokenizers library turns its thread pool off in a forked child by itself
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with ProcessPoolExecutor(n, mp_context=multiprocessing.get_context(method), initializer=_pool_init) as pool:
        summaries = list(pool.map(_pool_job, jobs))
    for summary in summaries:
        log.info("worker %s/%s: peak RSS %s MB", *summary["worker"], summary["peak_rss_mb"])
    return summaries[0]["records_total"]


def _pool_init() -> None:
    # one process per core: the tokenizer's own thread pool would only oversubscribe the cores
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _pool_job(config: PrepareConfig) -> dict:
    summary = run_prepare(config)
    return {
        "worker": [config.worker_index, config.num_workers],
        "records_total": summary.get("records_total", summary.get("counts", {}).get("documents_read")),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
    }


def _run_units(
    config: PrepareConfig,
    tokenizer,
    records: RecordStream,
    units: list,
    todo: list[int],
    stage: StageDir,
    executor: Executor,
) -> None:
    """Prepare these shards (every shard on Ray), with one progress bar."""
    local = executor.kind == "local"
    factory = partial(_UnitWorker, config, stage, records, units, tokenizer if local else None)

    from tqdm import tqdm

    started, tokens = time.time(), 0
    weights = {u: units[u][1] - units[u][0] for u in todo}
    with tqdm(
        total=sum(weights.values()), desc="prepare", unit=" docs", disable=not config.progress, dynamic_ncols=True
    ) as bar:
        for _, stats in run_units(
            todo,
            factory,
            executor,
            bar=bar,
            weights=weights,
            describe=lambda u: f"shard {DOCS_DIR}/{shard_name(u)} ({records.where(*units[u])})",
        ):
            tokens += stats["tokens"]
            bar.set_postfix(tokens=tokens, tok_s=f"{tokens / max(time.time() - started, 1e-9):,.0f}")


class _UnitWorker:
    """Prepares shards one at a time (`run`), in this process or in a Ray worker; the tokenizer
    is loaded once (or handed over when this process has it already)."""

    def __init__(self, config: PrepareConfig, stage: StageDir, records: RecordStream, units: list, tokenizer=None):
        self.config, self.stage, self.records, self.units = config, stage, records, units
        tokenizer = tokenizer or load_plain_tokenizer(config.tokenizer, trust_remote_code=config.trust_remote_code)
        self.spans = ByteSpanTokenizer(tokenizer, name=config.tokenizer)
        self.seen: set[bytes] = set()
        if config.dedupe:  # one process: the finished shards are the first ones, and hold every kept text
            for path in list_shards(Path(config.out) / DOCS_DIR):
                for text in read_parquet(path, columns=["text"]).column("text").to_pylist():
                    self.seen.add(content_key(text))

    def run(self, u: int, advance) -> dict:
        a, b = self.units[u]
        stats = _prepare_unit(self.stage, u, self.records.read(a, b), self.spans, self.config, self.seen)
        if stats["read"] != b - a:  # the index and the reader disagree: a bug
            raise AssertionError(f"shard {u}: read {stats['read']} records, expected {b - a}")
        advance(stats["read"])
        return stats


def _prepare_unit(stage: StageDir, index: int, records, spans, config: PrepareConfig, seen: set) -> dict:
    """Filter, tokenize and write one shard with its marker (the marker alone when nothing is kept)."""
    t0 = time.time()
    counts, rejects, docs, batches = RecordCounts(), [], [], []
    # each full batch is encoded on a second thread (the tokenizer releases the GIL) while this one
    # reads and decodes the next records; inline in a process meant to take one core
    with ThreadPoolExecutor(1, thread_name_prefix="encode") as pool:
        submit = pool.submit if _tokenizer_threads() else _run_now
        for rec in records:
            counts.read += 1
            text = accept_record(rec, config, spans, counts, seen, rejects)
            if text is not None:
                docs.append((rec.doc_id, rec.source, text))
                if len(docs) % config.batch_docs == 0:
                    batches.append(submit(spans.encode_batch, [d[2] for d in docs[-config.batch_docs :]]))
        if len(docs) % config.batch_docs:
            batches.append(submit(spans.encode_batch, [d[2] for d in docs[len(batches) * config.batch_docs :]]))
        batches = [b.result() for b in batches]
    table, written = docs_table(docs, batches, spans, config)
    for doc_id, detail in written["untokenizable"]:
        counts.rejected["untokenizable"] += 1
        rejects.append({"doc_id": doc_id, "reason": "untokenizable", "detail": detail})
    stats = {
        "documents": written["documents"],
        "tokens": written["tokens"],
        "read": counts.read,
        "normalized": counts.normalized,
        "rejected": dict(counts.rejected),
        "dropped": dict(counts.dropped),
        "rejects": rejects,
        "seconds": round(time.time() - t0, 3),
    }
    if written["documents"]:
        stage.write_shard(DOCS_DIR, index, table, stats)
    else:
        write_json_atomic(stage.marker_path(DOCS_DIR, index), {"empty": True, "time": time.time(), **stats})
    return stats


def _tokenizer_threads() -> bool:
    """Whether the tokenizer may use its thread pool (TOKENIZERS_PARALLELISM, read as `tokenizers` reads
    it): off in --processes workers and Ray tasks, which take one core each."""
    return os.environ.get("TOKENIZERS_PARALLELISM", "true").lower() not in ("", "off", "false", "f", "no", "n", "0")


def _run_now(fn, *args) -> Future:
    done = Future()
    done.set_result(fn(*args))
    return done


def _finish(
    stage: StageDir, config: PrepareConfig, sources, tokenizer_info: dict, total: int, done: dict[int, dict]
) -> dict:
    """The manifest, written from every shard's marker."""
    n_units = len(plan_units(total, config.shard_docs))
    markers = [done[u] for u in range(n_units)]
    rejected, dropped = Counter(), Counter()
    for m in markers:
        rejected.update(m["rejected"])
        dropped.update(m["dropped"])
    counts = {
        "documents_read": sum(m["read"] for m in markers),
        "documents_written": sum(m["documents"] for m in markers),
        "documents_rejected": dict(sorted(rejected.items())),
        "documents_dropped": dict(sorted(dropped.items())),
        "documents_normalized": sum(m["normalized"] for m in markers),
        "tokens": sum(m["tokens"] for m in markers),
    }
    accounted = counts["documents_written"] + sum(rejected.values()) + sum(dropped.values())
    if accounted != counts["documents_read"] or counts["documents_read"] != total:  # internal invariants
        raise AssertionError(
            f"document accounting broke: read {counts['documents_read']} of {total}, accounted {accounted}"
        )
    if not counts["documents_written"] and not config.allow_empty:
        why = ", ".join(f"{k} {v}" for k, v in {**rejected, **dropped}.items())
        raise BadInput(
            f"{', '.join(config.inputs)}: no documents: {counts['documents_read']:,} records read"
            + (f" ({why})" if why else "")
            + "; every later stage would run on nothing. Check the path, glob and "
            "--text-field/--template, or pass --allow-empty to write an empty prepared directory anyway."
        )
    rejects_path = Path(config.out) / "rejects.jsonl"
    if rejected:
        with atomic_file(rejects_path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            for m in markers:
                f.writelines(json.dumps(r) + "\n" for r in m["rejects"])
    return stage.finish(
        {
            "tokenizer": tokenizer_info,
            "inputs": [s.fingerprint() for s in sources],
            "shards": [f"{DOCS_DIR}/{shard_name(u)}" for u in range(n_units) if not done[u].get("empty")],
            "schema": {f.name: str(f.type) for f in DOCS_SCHEMA},
            "counts": counts,
            "seconds": round(sum(float(m.get("seconds", 0)) for m in markers), 2),
        }
    )
