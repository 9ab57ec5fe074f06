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

Resume: shards are numbered by their position in the (deterministic) record stream; a rerun
re-reads the stream (cheap) and only tokenizes and writes shards that have no completion marker.

Left out on purpose: fuzzy dedup, language or quality filters (use datatrove upstream), and
splitting one corpus over many prepare processes (scoring, the expensive stage, scales out).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from rptdata.errors import BadInput
from rptdata.manifest import STAGE_PREPARE, StageDir
from rptdata.models import DEFAULT_MODEL, load_tokenizer, model_name, vocab_hash
from rptdata.sources import RawRecord, TextBuilder, expand_inputs, read_source
from rptdata.spans import ByteSpanTokenizer

log = logging.getLogger(__name__)

DOCS_DIR = "docs"
DOCS_SCHEMA = pa.schema(
    [
        ("doc_id", pa.string()),
        ("source", pa.string()),
        ("text", pa.string()),
        ("token_ids", pa.list_(pa.int32())),
        ("token_end_bytes", pa.list_(pa.int32())),
        ("n_tokens", pa.int32()),
    ]
)


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

    def __post_init__(self):
        if not self.inputs:
            raise ValueError("give at least one input (file, folder, glob, builtin:champ or dataset id)")
        if self.text_field and self.template:
            raise ValueError("give either --text-field or --template, not both")
        if self.shard_docs < 1 or self.batch_docs < 1:
            raise ValueError("--shard-docs and --batch-docs must be at least 1")
        if self.max_docs is not None and self.max_docs < 1:
            raise ValueError("--max-docs must be at least 1")
        if self.min_chars < 1:
            raise ValueError("--min-chars must be at least 1 (empty documents are always dropped)")

    def identity(self) -> dict:
        """The options that decide the output (not where it goes or how it is shown)."""
        d = asdict(self)
        for k in ("out", "overwrite", "progress", "inputs", "batch_docs"):
            d.pop(k)
        return d


@dataclass
class _Counts:
    read: int = 0
    written: int = 0
    tokens: int = 0
    normalized: int = 0
    rejected: Counter = field(default_factory=Counter)
    dropped: Counter = field(default_factory=Counter)


def run_prepare(config: PrepareConfig) -> dict:
    started = time.time()
    tokenizer = load_tokenizer(config.tokenizer, trust_remote_code=config.trust_remote_code)
    spans = ByteSpanTokenizer(tokenizer, name=config.tokenizer)
    sources = expand_inputs(list(config.inputs))
    builder = TextBuilder(config.text_field, config.template)  # validates the template early
    tokenizer_info = {"name": model_name(config.tokenizer), "spec": config.tokenizer, "vocab_hash": vocab_hash(tokenizer)}
    stage = StageDir(Path(config.out), STAGE_PREPARE, [DOCS_DIR])
    state = stage.begin(
        {"inputs": [s.fingerprint() for s in sources], "options": config.identity(), "tokenizer": tokenizer_info},
        overwrite=config.overwrite,
    )
    if state == "done":
        log.info("%s is already complete; nothing to do", config.out)
        return json.loads((Path(config.out) / "manifest.json").read_text())
    done = stage.done_shards(DOCS_DIR)
    if done:
        log.info("resuming: %d shard(s) already complete", len(done))

    counts = _Counts()
    rejects_tmp = Path(config.out) / f"rejects.jsonl.tmp-{os.getpid()}"
    seen: set[bytes] = set()
    buffer: list[tuple[str, str, str]] = []  # (doc_id, source, text)
    shard_index = 0

    from tqdm import tqdm

    bar = tqdm(desc="prepare", unit=" docs", disable=not config.progress, dynamic_ncols=True)

    def flush() -> None:
        nonlocal shard_index, buffer
        if shard_index in done:
            stats = done[shard_index]
        else:
            stats = _write_docs_shard(stage, shard_index, buffer, spans, config)
        for doc_id, detail in stats["untokenizable"]:
            counts.rejected["untokenizable"] += 1
            rejects.write(json.dumps({"doc_id": doc_id, "reason": "untokenizable", "detail": detail}) + "\n")
        counts.written += stats["documents"]
        counts.tokens += stats["tokens"]
        bar.set_postfix(tokens=counts.tokens, tok_s=f"{counts.tokens / max(time.time() - started, 1e-9):,.0f}")
        shard_index += 1
        buffer = []

    try:
        with open(rejects_tmp, "w", encoding="utf-8") as rejects:
            for rec in _records(sources, builder, config):
                counts.read += 1
                bar.update(1)
                text = _accept(rec, config, spans, counts, seen, rejects)
                if text is not None:
                    buffer.append((rec.doc_id, rec.source, text))
                    if len(buffer) >= config.shard_docs:
                        flush()
            if buffer:
                flush()
    except BaseException:  # a failed run (a bad record, a full disk) leaves no temporary file
        rejects_tmp.unlink(missing_ok=True)
        raise
    bar.close()
    if counts.rejected:
        os.replace(rejects_tmp, Path(config.out) / "rejects.jsonl")
    else:
        rejects_tmp.unlink()

    accounted = counts.written + sum(counts.rejected.values()) + sum(counts.dropped.values())
    if accounted != counts.read:  # an internal invariant, not user input
        raise AssertionError(f"document accounting broke: read {counts.read} != accounted {accounted}")
    return stage.finish(
        {
            "tokenizer": tokenizer_info,
            "inputs": [s.fingerprint() for s in sources],
            "shards": [f"{DOCS_DIR}/part-{i:05d}.parquet" for i in range(shard_index)],
            "schema": {f.name: str(f.type) for f in DOCS_SCHEMA},
            "counts": {
                "documents_read": counts.read,
                "documents_written": counts.written,
                "documents_rejected": dict(sorted(counts.rejected.items())),
                "documents_dropped": dict(sorted(counts.dropped.items())),
                "documents_normalized": counts.normalized,
                "tokens": counts.tokens,
            },
            "seconds": round(time.time() - started, 2),
        }
    )


def _records(sources, builder, config: PrepareConfig):
    """Every record of every source, in order; only the first --max-docs when given."""
    n = 0
    for src in sources:
        for rec in read_source(src, builder, config.split):
            if config.max_docs is not None and n >= config.max_docs:
                return
            n += 1
            yield rec


def _accept(rec: RawRecord, config, spans, counts: _Counts, seen: set, rejects) -> str | None:
    """The record's (normalized) text if it is kept; else count it, and log a reject."""
    reason, detail, text = rec.reject, rec.detail, rec.text
    if reason is None:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            reason, detail = "invalid_unicode", f"lone surrogate at character {e.start}"
    if reason is not None:
        if not config.skip_bad:
            raise BadInput(f"{rec.where()}: {reason.replace('_', ' ')}: {detail} (pass --skip-bad to skip such records)")
        counts.rejected[reason] += 1
        rejects.write(json.dumps({"doc_id": rec.doc_id, "reason": reason, "detail": detail}) + "\n")
        return None
    normalized = spans.normalize(text)
    if normalized != text:
        counts.normalized += 1
    text = normalized
    if not text.strip():
        counts.dropped["empty"] += 1
        return None
    if len(text) < config.min_chars:
        counts.dropped["too_short"] += 1
        return None
    if config.dedupe:
        key = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
        if key in seen:
            counts.dropped["duplicate"] += 1
            return None
        seen.add(key)
    return text


def _write_docs_shard(stage: StageDir, index: int, docs: list, spans: ByteSpanTokenizer, config) -> dict:
    """Tokenize and write one shard. Documents that cannot get exact spans are left out and
    returned as `untokenizable` (an error without --skip-bad)."""
    ids_parts, ends_parts, counts_parts, kept, untokenizable = [], [], [], [], []
    for start in range(0, len(docs), config.batch_docs):
        chunk = docs[start : start + config.batch_docs]
        batch = spans.encode_batch([d[2] for d in chunk])
        keep = np.ones(len(chunk), dtype=bool)
        for j in batch.bad:
            if not config.skip_bad:
                raise BadInput(
                    f"{chunk[j][0]}: cannot record exact byte spans: {spans.explain(chunk[j][2])} "
                    "(pass --skip-bad to skip such documents)"
                )
            untokenizable.append((chunk[j][0], spans.explain(chunk[j][2])))
            keep[j] = False
        doc_counts = np.diff(batch.offsets)
        tok_keep = np.repeat(keep, doc_counts)
        ids_parts.append(batch.ids[tok_keep])
        ends_parts.append(batch.ends[tok_keep])
        counts_parts.append(doc_counts[keep])
        kept += [d for d, k in zip(chunk, keep) if k]
    docs = kept
    n_tokens = np.concatenate(counts_parts).astype(np.int32)
    offsets = pa.array(np.concatenate([[0], np.cumsum(n_tokens, dtype=np.int64)]).astype(np.int32))
    table = pa.Table.from_arrays(
        [
            pa.array([d[0] for d in docs], pa.string()),
            pa.array([d[1] for d in docs], pa.string()),
            pa.array([d[2] for d in docs], pa.string()),
            pa.ListArray.from_arrays(offsets, pa.array(np.concatenate(ids_parts), pa.int32())),
            pa.ListArray.from_arrays(offsets, pa.array(np.concatenate(ends_parts), pa.int32())),
            pa.array(n_tokens, pa.int32()),
        ],
        schema=DOCS_SCHEMA,
    )
    stats = {"documents": len(docs), "tokens": int(n_tokens.sum()), "untokenizable": untokenizable}
    stage.write_shard(DOCS_DIR, index, table, stats)
    return stats
