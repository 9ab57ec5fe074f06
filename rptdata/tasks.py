"""`rpt make-tasks`: scored positions -> RPT tasks (context, continuation, boundaries), split by document.

    run_make_tasks(MakeTasksConfig(scored_dir="out/scored", out="out/tasks")) -> manifest dict

A task is one scored position of a document: its context, continuation and boundaries are
defined in `rptdata.taskdef` (with the split rule and TASKS_SCHEMA), its band in
`rptdata.bands`; this module only applies them to whole directories. See docs/tasks.md for the
schema; the readers of a tasks directory are in `rpttrain.data`.

Output:
    OUT/train/part-NNNNN.parquet  tasks of training documents (one shard per scored shard)
    OUT/eval/part-NNNNN.parquet   tasks of held-out documents (never trained on)
    OUT/manifest.json             tokenizer + proxy (copied), options, split rule, bands, counts

Every position read is accounted for: positions_in = tasks_train + tasks_eval + sum(skipped),
with one reason per skipped position (`nan_entropy`, `below_threshold`, `mid_character`,
`empty_context`, `low_live`, `over_max_tasks`, `over_max_eval_tasks`).

Live groups (`rptdata.live`): every task carries `accept_mass` (q, the proxy's probability at
`temperature` of a one-token prediction the prefix reward accepts) and `live` (1 - q^G -
(1-q)^G for G = `group_size`), from `target_logprob` and, when the scorer saved them, the top-k
tokens (whose bytes are read with the tokenizer the manifest names). `min_live` drops training
positions below it (`low_live`), before the caps; evaluation positions are never filtered.

Documents go to `eval` when a seeded SHA-256 of their id falls below `eval_fraction`
(`rptdata.taskdef.split_of`); the rule is in the manifest, so later stages can recompute it. `--max-tasks` keeps
the tasks with the smallest seeded hash of their task id: exact and deterministic, found by a
first pass that holds only a heap of (hash, shard, row) of size N, never the tasks themselves.

Memory is one docs shard and its positions shard at a time. Resume and rerun refusal are
`rptdata.manifest.StageDir`'s: a shard is done when both of its split shards have markers.

Left out on purpose: splitting the work between processes (this stage is I/O-bound and fast),
filtering by band (bands are labels; filter with `--threshold` or when loading), and balancing
bands or documents when capping (the cap is a uniform random sample of the eligible tasks).
"""

from __future__ import annotations

import hashlib
import heapq
import json
import logging
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rptdata.errors import BadInput, ManifestMismatch, MissingUpstream
from rptdata.live import accepted_prediction, live_probability, position_accept_mass
from rptdata.bands import DEFAULT_BANDS, OTHER_BAND, as_bands, band_of
from rptdata.manifest import (
    MANIFEST,
    STAGE_PREPARE,
    STAGE_SCORE,
    STAGE_TASKS,
    StageDir,
    check_shard,
    list_shards,
    parquet_errors,
    read_manifest,
    read_parquet,
    shard_index,
    shard_name,
)
from rptdata.taskdef import SPLITS, TASKS_SCHEMA, continuation_at, cut_context, split_of, split_rule, task_id_of

log = logging.getLogger(__name__)

__all__ = ["SKIP_REASONS", "MakeTasksConfig", "run_make_tasks"]

STAGE = STAGE_TASKS
POSITIONS_DIR = "positions"
DOCS_DIR = "docs"
SKIP_REASONS = (
    "nan_entropy",  # the scorer wrote no entropy for this position
    "below_threshold",  # entropy < --threshold
    "mid_character",  # the context would end inside a multi-byte character
    "empty_context",  # position 0, or a context window that holds no whole character
    "low_live",  # a training position whose predicted live-group probability is below --min-live
    "over_max_tasks",  # an eligible training task beyond --max-tasks
    "over_max_eval_tasks",  # an eligible evaluation task beyond --max-eval-tasks
)

# ---------------------------------------------------------------------------------------------
# pure helpers


def _task_key(task_id: str, seed: int) -> int:
    """The seeded hash that orders tasks for --max-tasks (smallest kept)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:task:{task_id}".encode("utf-8")).digest()[:16], "big")


# ---------------------------------------------------------------------------------------------
# config


@dataclass(frozen=True)
class MakeTasksConfig:
    """Options of `rpt make-tasks`.

    Fields:
        scored_dir: a finished `rpt score-entropy` directory.
        out: where to write the tasks.
        threshold: keep positions with entropy >= threshold (the paper does not state its
            value; 0.5 is the lower edge of its easy split). 0 keeps every position.
        context_tokens: at most this many tokens of context before the position.
        continuation_tokens: tokens in the continuation (the longest prediction that scores).
        eval_fraction: share of documents held out for evaluation (by a seeded hash).
        seed: seeds the document split and the --max-tasks sample.
        max_tasks / max_eval_tasks: keep at most this many training / evaluation tasks, a
            seeded uniform sample of the eligible ones (None: all).
        bands: (name, threshold) pairs, increasing; a task's band is the highest it exceeds.
        min_live: drop training positions whose predicted probability of a mixed-reward group
            (`live`) is below this (None: keep all). Evaluation positions are never dropped.
        group_size / temperature: G and T of the live estimate (`rptdata.live`); match the
            trainer's group size and sampling temperature.
        prepared_dir: the `rpt prepare` directory; default: the one the scored manifest names.
        overwrite: replace a run in `out` made with other options.
        progress: show a progress bar.
    """

    scored_dir: str
    out: str
    threshold: float = 0.5
    context_tokens: int = 1024
    continuation_tokens: int = 8
    eval_fraction: float = 0.1
    seed: int = 0
    max_tasks: int | None = None
    max_eval_tasks: int | None = None
    bands: tuple[tuple[str, float], ...] = DEFAULT_BANDS
    min_live: float | None = None
    group_size: int = 8
    temperature: float = 0.8
    prepared_dir: str | None = None
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self):
        object.__setattr__(self, "bands", as_bands(self.bands))
        if not math.isfinite(self.threshold):
            raise ValueError(f"--threshold must be a finite number, not {self.threshold}")
        if self.context_tokens < 1:
            raise ValueError("--context-tokens must be at least 1: a task needs some context to predict from")
        if self.continuation_tokens < 1:
            raise ValueError("--continuation-tokens must be at least 1: the continuation holds the target token")
        if not 0.0 <= self.eval_fraction <= 1.0:
            raise ValueError(f"--eval-fraction is a share of documents, between 0 and 1; got {self.eval_fraction}")
        if self.min_live is not None and not 0.0 <= self.min_live <= 1.0:
            raise ValueError(f"--min-live is a probability, between 0 and 1; got {self.min_live}")
        if self.group_size < 2:
            raise ValueError(f"--group-size must be at least 2: one sample cannot disagree with itself; got {self.group_size}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"--temperature must be a positive number (the sampling temperature); got {self.temperature}")
        for name, cap in (("--max-tasks", self.max_tasks), ("--max-eval-tasks", self.max_eval_tasks)):
            if cap is not None and cap < 0:
                raise ValueError(f"{name} must be 0 or more (or left out for no cap); got {cap}")

    def identity(self) -> dict:
        """The options that decide the output (not where it goes or how it is shown)."""
        d = asdict(self)
        for k in ("scored_dir", "out", "prepared_dir", "overwrite", "progress"):
            d.pop(k)
        d["bands"] = [list(b) for b in self.bands]
        return d


# ---------------------------------------------------------------------------------------------
# one shard, vectorized filters


class _Shard:
    """A docs shard joined with its positions shard, with every position's fate decided.

    `reason[i]` is 0 for an eligible position, else 1 + index into SKIP_REASONS (the caps are
    applied later). Filters are numpy over flat arrays: the text column's UTF-8 buffer and the
    token ends' values, indexed by each position's document row.
    """

    def __init__(
        self,
        index: int,
        docs: pa.Table,
        positions: pa.Table,
        config: MakeTasksConfig,
        where: str,
        vocab: "_Vocab | None" = None,
    ):
        self.index = index
        self.doc_ids: list[str] = docs.column("doc_id").to_pylist()
        row_of = {d: r for r, d in enumerate(self.doc_ids)}
        if len(row_of) != len(self.doc_ids):
            raise BadInput(f"{where}: the docs shard holds a doc_id twice")
        text = docs.column("text").cast(pa.large_string()).combine_chunks()
        self.text_off = np.frombuffer(text.buffers()[1], dtype=np.int64)[text.offset : text.offset + len(text) + 1]
        data = text.buffers()[2]
        self.text_data = np.frombuffer(data, dtype=np.uint8) if data is not None else np.zeros(0, np.uint8)
        ends = docs.column("token_end_bytes").combine_chunks()
        ids = docs.column("token_ids").combine_chunks()
        self.ends_off = ends.offsets.to_numpy().astype(np.int64)
        self.ends_flat = ends.values.to_numpy().astype(np.int64)
        ids_off = ids.offsets.to_numpy().astype(np.int64)
        ids_flat = ids.values.to_numpy()
        n_tok = np.diff(self.ends_off)

        p_doc = positions.column("doc_id").to_pylist()
        self.n = len(p_doc)
        try:
            self.row = np.fromiter((row_of[d] for d in p_doc), dtype=np.int64, count=self.n)
        except KeyError as e:
            raise BadInput(f"{where}: position of document {e.args[0]!r}, which is not in the matching docs shard") from None
        self.pos = positions.column("pos").to_numpy().astype(np.int64)
        self.token_id = positions.column("token_id").to_numpy().astype(np.int64)
        self.entropy = positions.column("entropy").to_numpy(zero_copy_only=False).astype(np.float32)
        self.logprob = _optional(positions, "target_logprob", np.float32, self.n)
        self.rank = _optional(positions, "target_rank", np.int64, self.n)
        self.topk = None
        if vocab is not None and "topk_ids" in positions.column_names and "topk_logprobs" in positions.column_names:
            self.topk = (positions.column("topk_ids").to_pylist(), positions.column("topk_logprobs").to_pylist())

        if self.n and (np.any(self.pos < 0) or np.any(self.pos >= n_tok[self.row])):
            bad = int(np.nonzero((self.pos < 0) | (self.pos >= n_tok[self.row]))[0][0])
            raise BadInput(f"{where}: position {self.pos[bad]} of {p_doc[bad]!r} is outside its {n_tok[self.row[bad]]} tokens")
        tok_at = ids_flat[ids_off[self.row] + self.pos] if self.n else np.zeros(0, np.int64)
        if np.any(tok_at != self.token_id):
            bad = int(np.nonzero(tok_at != self.token_id)[0][0])
            raise ManifestMismatch(
                f"{where}: token_id at {p_doc[bad]!r}@{self.pos[bad]} is {self.token_id[bad]}, but the prepared "
                f"document has {tok_at[bad]} there; the scored and prepared directories do not belong together"
            )
        if self.n and len(np.unique(self.row * (int(n_tok.max()) + 1) + self.pos)) != self.n:
            raise BadInput(f"{where}: the positions shard lists a (doc_id, pos) twice")

        self.reason = np.zeros(self.n, dtype=np.int8)
        self.start = np.zeros(self.n, dtype=np.int64)  # first context token of each position
        self._filter(config)
        self.split_eval = np.array([split_of(d, config.seed, config.eval_fraction) == "eval" for d in self.doc_ids], bool)
        self.pos_eval = self.split_eval[self.row] if self.n else np.zeros(0, bool)
        self.accept_mass = np.full(self.n, np.nan, np.float64)
        self.live = np.full(self.n, np.nan, np.float64)
        if self.logprob is not None:
            self._estimate_live(config, vocab)
        elif config.min_live is not None:
            raise BadInput(f"{where}: no target_logprob column, so --min-live has nothing to estimate from")
        if config.min_live is not None:  # training positions only: the eval split is never filtered
            low = ~(self.live >= config.min_live)  # NaN (no estimate) counts as low
            self._mark(low & ~self.pos_eval, "low_live")

    def _end(self, token: np.ndarray) -> np.ndarray:
        """Byte offset (within each position's document) where `token` ends; token -1 ends at 0."""
        idx = self.ends_off[self.row] + np.maximum(token, 0) - 1
        safe = np.clip(idx, 0, max(len(self.ends_flat) - 1, 0))
        return np.where(token > 0, self.ends_flat[safe] if len(self.ends_flat) else 0, 0)

    def _char_start(self, offset: np.ndarray) -> np.ndarray:
        """True where `offset` (within each position's document) is a character boundary."""
        glob = self.text_off[self.row] + offset
        at_end = glob >= self.text_off[self.row + 1]
        byte = self.text_data[np.clip(glob, 0, max(len(self.text_data) - 1, 0))] if len(self.text_data) else 0
        return at_end | ((byte & 0xC0) != 0x80)

    def _mark(self, mask: np.ndarray, reason: str) -> None:
        self.reason[(self.reason == 0) & mask] = SKIP_REASONS.index(reason) + 1

    def _filter(self, config: MakeTasksConfig) -> None:
        if not self.n:
            return
        self._mark(np.isnan(self.entropy), "nan_entropy")
        self._mark(self.entropy.astype(np.float64) < config.threshold, "below_threshold")  # as band_of compares
        self._mark(~self._char_start(self._end(self.pos)), "mid_character")
        # the same rule as _context_start, vectorized: move forward while inside a character
        self.start = np.maximum(self.pos - config.context_tokens, 0)
        for _ in range(8):  # a character is at most 4 bytes, so at most 3 moves
            move = (self.start < self.pos) & ~self._char_start(self._end(self.start))
            if not move.any():
                break
            self.start = self.start + move
        self._mark(self.start >= self.pos, "empty_context")

    def _estimate_live(self, config: MakeTasksConfig, vocab: "_Vocab | None") -> None:
        """accept_mass (q) and live for every position still eligible (`rptdata.live`)."""
        cache_row, text_bytes, ends = -1, b"", np.zeros(0, np.int64)
        for i in np.nonzero(self.reason == 0)[0]:
            r = int(self.row[i])
            if r != cache_row:
                cache_row = r
                text_bytes, ends = self.doc_bytes(r)
            continuation, boundaries = continuation_at(text_bytes, ends, int(self.pos[i]), config.continuation_tokens)
            cont = continuation.encode("utf-8")
            # the true token is cont[:boundaries[0]]: accepted unless it ends inside a character
            target_ok = accepted_prediction(cont[: boundaries[0]], cont, boundaries)
            topk = None
            if self.topk is not None and vocab is not None and self.topk[0][i]:
                ids = self.topk[0][i]
                ok = [vocab.accepts(t, cont, boundaries) for t in ids]
                topk = (ids, self.topk[1][i], ok)
            q = position_accept_mass(float(self.logprob[i]), target_ok, config.temperature, topk, int(self.token_id[i]))
            # rounded to float32 as stored, so --min-live keeps exactly the rows whose stored
            # `live` is >= it (as a query of the written shards would find)
            self.accept_mass[i] = np.float32(q)
            self.live[i] = np.float32(live_probability(q, config.group_size))

    def eligible(self) -> np.ndarray:
        return np.nonzero(self.reason == 0)[0]

    def task_id(self, i: int) -> str:
        return task_id_of(self.doc_ids[self.row[i]], int(self.pos[i]))

    def doc_bytes(self, r: int) -> tuple[bytes, np.ndarray]:
        return (
            self.text_data[self.text_off[r] : self.text_off[r + 1]].tobytes(),
            self.ends_flat[self.ends_off[r] : self.ends_off[r + 1]],
        )


class _Vocab:
    """Token id -> bytes, for judging the saved top-k tokens against a continuation. Special
    tokens never count: a sampled stop token decodes to nothing."""

    def __init__(self, tokenizer):
        from rptdata.spans import ByteSpanTokenizer

        self.token_bytes = ByteSpanTokenizer(tokenizer).token_bytes
        self.special = set(getattr(tokenizer, "all_special_ids", None) or [])

    def accepts(self, token_id: int, continuation: bytes, boundaries) -> bool:
        if token_id in self.special or not 0 <= token_id < len(self.token_bytes):
            return False
        return accepted_prediction(self.token_bytes[token_id], continuation, boundaries)


def _load_vocab(sm: dict, scored: Path) -> _Vocab | None:
    """The tokenizer the scored manifest names, when the scorer saved top-k tokens; else None."""
    if not (sm.get("options") or {}).get("save_topk"):
        return None
    from rptdata.models import load_tokenizer, vocab_hash

    info = sm.get("tokenizer") or {}
    spec = info.get("spec") or info.get("name")
    if not spec:
        raise MissingUpstream(f"{scored}/{MANIFEST} names no tokenizer; the saved top-k tokens cannot be read")
    tokenizer = load_tokenizer(spec)
    if info.get("vocab_hash") and vocab_hash(tokenizer) != info["vocab_hash"]:
        raise ManifestMismatch(
            f"the tokenizer {spec!r} named by {scored}/{MANIFEST} now has another vocabulary than it was scored with"
        )
    return _Vocab(tokenizer)


def _optional(table: pa.Table, name: str, dtype, n: int) -> np.ndarray | None:
    if name not in table.column_names:
        return None
    return table.column(name).to_numpy(zero_copy_only=False).astype(dtype)


# ---------------------------------------------------------------------------------------------
# the stage


@dataclass(frozen=True)
class _Inputs:
    scored: Path
    prepared: Path
    scored_manifest: dict
    prepared_manifest: dict
    shards: list[int]
    vocab: _Vocab | None = None


def _open_inputs(config: MakeTasksConfig) -> _Inputs:
    scored = Path(config.scored_dir).resolve()
    sm = read_manifest(scored, STAGE_SCORE)
    recorded = sm.get("prepared") or {}  # {"dir", "fingerprint"} (rptdata/score.py)
    prep = config.prepared_dir or recorded.get("dir") or sm.get("prepared_dir")
    if not prep:
        raise MissingUpstream(f"{scored}/{MANIFEST} does not name its prepared directory; pass --prepared")
    prepared = Path(prep)
    if not prepared.is_absolute():
        prepared = (scored / prepared) if (scored / prepared).exists() else prepared
    prepared = prepared.resolve()
    if not (prepared / MANIFEST).exists():
        raise MissingUpstream(
            f"the prepared directory {prepared} (named by {scored}/{MANIFEST}) is not there; "
            "pass --prepared with its new location"
        )
    pm = read_manifest(prepared, STAGE_PREPARE)
    if recorded.get("fingerprint") and pm.get("fingerprint") != recorded["fingerprint"]:
        raise ManifestMismatch(
            f"{scored} was scored from a prepare run with fingerprint {recorded['fingerprint']}, but {prepared} "
            f"holds fingerprint {pm.get('fingerprint')} (prepared again with other inputs or options?)"
        )
    s_hash = (sm.get("tokenizer") or {}).get("vocab_hash")
    p_hash = (pm.get("tokenizer") or {}).get("vocab_hash")
    if s_hash != p_hash:
        raise ManifestMismatch(
            f"{scored} was scored with tokenizer vocab {s_hash}, but {prepared} was prepared with {p_hash}; "
            "the token ids would not line up"
        )
    missing = [name for name in sm.get("shards", []) if not (scored / name).exists()]
    if missing:
        raise MissingUpstream(f"{scored}: the manifest lists {len(missing)} shard(s) that are not there, e.g. {missing[0]}")
    shards = []
    for path in list_shards(scored / POSITIONS_DIR):
        index = shard_index(path)
        if not (prepared / DOCS_DIR / shard_name(index)).exists():
            raise MissingUpstream(f"{path} has no matching docs shard {prepared / DOCS_DIR / shard_name(index)}")
        shards.append(index)
    return _Inputs(scored, prepared, sm, pm, shards, _load_vocab(sm, scored))


def _load_shard(inputs: _Inputs, index: int, config: MakeTasksConfig) -> _Shard:
    docs_path = check_shard(inputs.prepared, f"{DOCS_DIR}/{shard_name(index)}", inputs.prepared_manifest)
    docs = read_parquet(docs_path, columns=["doc_id", "text", "token_ids", "token_end_bytes"])
    pos_path = check_shard(inputs.scored, f"{POSITIONS_DIR}/{shard_name(index)}", inputs.scored_manifest)
    with parquet_errors(pos_path):
        schema = pq.read_schema(pos_path)
    wanted = ["doc_id", "pos", "token_id", "entropy", "target_logprob", "target_rank", "topk_ids", "topk_logprobs"]
    missing = [c for c in wanted[:4] if c not in schema.names]
    if missing:
        raise BadInput(f"{pos_path}: missing column(s) {', '.join(missing)}; is this a score-entropy shard?")
    positions = read_parquet(pos_path, columns=[c for c in wanted if c in schema.names])
    return _Shard(index, docs, positions, config, str(pos_path), inputs.vocab)


def _select_capped(inputs: _Inputs, config: MakeTasksConfig) -> dict[str, dict[int, set[int]] | None]:
    """First pass for the caps: per split, shard -> positions-row indices of the kept tasks.

    Holds only a max-heap of the N smallest (task hash, shard, row) per split.
    """
    caps = {"train": config.max_tasks, "eval": config.max_eval_tasks}
    heaps: dict[str, list] = {s: [] for s in SPLITS}
    for index in inputs.shards:
        shard = _load_shard(inputs, index, config)
        for i in shard.eligible():
            split = "eval" if shard.pos_eval[i] else "train"
            cap = caps[split]
            if cap is None or cap == 0:
                continue
            item = (-_task_key(shard.task_id(i), config.seed), -index, -int(i))  # max-heap of the smallest keys
            heap = heaps[split]
            if len(heap) < cap:
                heapq.heappush(heap, item)
            elif item > heap[0]:
                heapq.heapreplace(heap, item)
    out: dict[str, dict[int, set[int]] | None] = {}
    for split in SPLITS:
        if caps[split] is None:
            out[split] = None
            continue
        chosen: dict[int, set[int]] = {}
        for _, neg_index, neg_row in heaps[split]:
            chosen.setdefault(-neg_index, set()).add(-neg_row)
        out[split] = chosen
    return out


def _build_tasks(shard: _Shard, rows: np.ndarray, config: MakeTasksConfig) -> pa.Table:
    cols: dict[str, list] = {f.name: [] for f in TASKS_SCHEMA}
    cache_row, text_bytes, ends = -1, b"", np.zeros(0, np.int64)
    for i in rows:
        r = int(shard.row[i])
        if r != cache_row:
            cache_row = r
            text_bytes, ends = shard.doc_bytes(r)
        pos = int(shard.pos[i])
        context, n_ctx = cut_context(text_bytes, ends, pos, config.context_tokens)
        if n_ctx != pos - int(shard.start[i]):  # the vectorized filter and the helper must agree
            raise AssertionError(f"context cut disagrees at {shard.task_id(i)}: {n_ctx} != {pos - shard.start[i]}")
        continuation, boundaries = continuation_at(text_bytes, ends, pos, config.continuation_tokens)
        entropy = float(shard.entropy[i])
        cols["task_id"].append(shard.task_id(i))
        cols["doc_id"].append(shard.doc_ids[r])
        cols["pos"].append(pos)
        cols["context"].append(context)
        cols["continuation"].append(continuation)
        cols["boundaries"].append(boundaries)
        cols["entropy"].append(entropy)
        cols["band"].append(band_of(entropy, config.bands))
        cols["target_id"].append(int(shard.token_id[i]))
        cols["context_tokens"].append(n_ctx)
        cols["target_logprob"].append(None if shard.logprob is None else float(shard.logprob[i]))
        cols["target_rank"].append(None if shard.rank is None else int(shard.rank[i]))
        q, live = float(shard.accept_mass[i]), float(shard.live[i])
        cols["accept_mass"].append(None if math.isnan(q) else q)
        cols["live"].append(None if math.isnan(live) else live)
    return pa.Table.from_pydict(cols, schema=TASKS_SCHEMA)


def _write_task_shard(stage: StageDir, shard: _Shard, chosen: dict, config: MakeTasksConfig) -> dict:
    """Build and write one shard's train and eval tasks; return its stats (also in the markers)."""
    skipped = Counter(SKIP_REASONS[int(c) - 1] for c in shard.reason[shard.reason > 0])
    eligible = shard.eligible()
    stats: dict = {"positions": shard.n, "tasks": {}, "bands": {}, "documents": {}, "documents_with_tasks": {}}
    tables: dict[str, pa.Table] = {}
    for split, over in (("train", "over_max_tasks"), ("eval", "over_max_eval_tasks")):
        in_split = eligible[shard.pos_eval[eligible] == (split == "eval")]
        if chosen[split] is not None:
            keep = chosen[split].get(shard.index, set())
            mask = np.fromiter((int(i) in keep for i in in_split), dtype=bool, count=len(in_split))
            skipped[over] += int((~mask).sum())
            in_split = in_split[mask]
        table = _build_tasks(shard, in_split, config)
        tables[split] = table
        stats["tasks"][split] = table.num_rows
        stats["bands"][split] = dict(Counter(table.column("band").to_pylist()))
        docs_in_split = np.unique(shard.row[shard.pos_eval == (split == "eval")])
        stats["documents"][split] = int(len(docs_in_split))
        stats["documents_with_tasks"][split] = int(len(np.unique(shard.row[in_split])))
        live = shard.live[in_split]
        stats.setdefault("live_sum", {})[split] = float(np.nansum(live))
        stats.setdefault("live_n", {})[split] = int(np.count_nonzero(~np.isnan(live)))
    stats["skipped"] = {r: int(skipped.get(r, 0)) for r in SKIP_REASONS}
    # train first; the eval marker, written last, carries the whole shard's stats
    stage.write_shard("train", shard.index, tables["train"], {"tasks": tables["train"].num_rows})
    stage.write_shard("eval", shard.index, tables["eval"], stats)
    return stats


def _done(stage: StageDir) -> dict[int, dict]:
    """Shards whose train and eval outputs are both complete -> their stats (from the eval
    marker, which is written last)."""
    train = stage.done_shards("train")
    return {i: s for i, s in stage.done_shards("eval").items() if i in train and "positions" in s}


def run_make_tasks(config: MakeTasksConfig) -> dict:
    """Run the stage (see the module docstring); returns the manifest."""
    started = time.time()
    inputs = _open_inputs(config)
    sm = inputs.scored_manifest
    stage = StageDir(Path(config.out), STAGE, list(SPLITS))
    state = stage.begin(
        {
            "scored": sm.get("fingerprint"),
            "prepared": inputs.prepared_manifest.get("fingerprint"),
            "options": config.identity(),
            "tokenizer": sm.get("tokenizer"),
        },
        overwrite=config.overwrite,
    )
    if state == "done":
        log.info("%s is already complete; nothing to do", config.out)
        return json.loads((Path(config.out) / MANIFEST).read_text())
    done = _done(stage)
    if done:
        log.info("resuming: %d shard(s) already complete", len(done))

    chosen: dict = {"train": None, "eval": None}
    if config.max_tasks is not None or config.max_eval_tasks is not None:
        chosen = _select_capped(inputs, config)

    from tqdm import tqdm

    per_shard: list[dict] = []
    for index in tqdm(inputs.shards, desc="make-tasks", unit=" shard", disable=not config.progress, dynamic_ncols=True):
        if index in done:
            per_shard.append(done[index])
            continue
        shard = _load_shard(inputs, index, config)
        per_shard.append(_write_task_shard(stage, shard, chosen, config))

    counts = _sum_counts(per_shard, config)
    accounted = sum(counts["tasks"].values()) + sum(counts["skipped"].values())
    if accounted != counts["positions_in"]:  # an internal invariant, not user input
        raise AssertionError(f"position accounting broke: read {counts['positions_in']} != accounted {accounted}")
    return stage.finish(
        {
            "scored_dir": str(inputs.scored),
            "prepared_dir": str(inputs.prepared),
            "tokenizer": sm.get("tokenizer"),
            "proxy": sm.get("proxy"),
            "options": config.identity(),
            "bands": {name: t for name, t in config.bands},
            "split": split_rule(config.seed, config.eval_fraction),
            "shards": {split: [f"{split}/{shard_name(i)}" for i in inputs.shards] for split in SPLITS},
            "schema": {f.name: str(f.type) for f in TASKS_SCHEMA},
            "counts": counts,
            "live_estimate": {
                "group_size": config.group_size,
                "temperature": config.temperature,
                "min_live": config.min_live,
                "topk": inputs.vocab is not None,
                "exact_when": "the policy is the proxy and the prompt format is `continuation` (one sampled token)",
                "function": "rptdata.live.position_accept_mass",
            },
            "seconds": round(time.time() - started, 2),
        }
    )


def _sum_counts(per_shard: list[dict], config: MakeTasksConfig) -> dict:
    band_names = [n for n, _ in config.bands] + [OTHER_BAND]
    counts: dict = {
        "positions_in": sum(s["positions"] for s in per_shard),
        "tasks": {split: sum(s["tasks"][split] for s in per_shard) for split in SPLITS},
        "tasks_by_band": {
            split: {b: sum(s["bands"][split].get(b, 0) for s in per_shard) for b in band_names} for split in SPLITS
        },
        "documents": {split: sum(s["documents"][split] for s in per_shard) for split in SPLITS},
        "documents_with_tasks": {split: sum(s["documents_with_tasks"][split] for s in per_shard) for split in SPLITS},
        "skipped": {r: sum(s["skipped"][r] for s in per_shard) for r in SKIP_REASONS},
    }
    # the mean of `live` over the written tasks: the share of groups predicted to carry signal
    counts["predicted_live"] = {}
    for split in SPLITS:
        n = sum(s.get("live_n", {}).get(split, 0) for s in per_shard)
        total = sum(s.get("live_sum", {}).get(split, 0.0) for s in per_shard)
        counts["predicted_live"][split] = round(total / n, 6) if n else None
    return counts
