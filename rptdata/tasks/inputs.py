"""make-tasks' inputs: the scored positions of one shard with their documents, and the vectorized
filters that mark which positions become tasks (and why the others do not). `rptdata.tasks` runs
the stage over these.

    inputs = open_inputs(config)           # the scored run, its prepared documents, the vocabulary
    shard = load_shard(inputs, 0, config)  # one shard's positions and documents, filtered
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rptdata.errors import BadInput, ManifestMismatch, MissingUpstream
from rptdata.io import (
    MANIFEST,
    STAGE_PREPARE,
    STAGE_SCORE,
    check_shard,
    list_shards,
    parquet_errors,
    read_manifest,
    read_parquet,
    shard_index,
    shard_name,
)
from rptdata.models import check_tokenizer, load_tokenizer, vocab_hash
from rptdata.tasks.config import DOCS_DIR, POSITIONS_DIR, SKIP_REASONS, MakeTasksConfig
from rptdata.tasks.live import accepted_prediction, live_probability, position_accept_mass
from rptdata.tasks.taskdef import continuation_at, split_of, task_id_of

log = logging.getLogger(__name__)


class Shard:
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
        vocab: _Vocab | None = None,
    ):
        self.index = index
        self.reasons = SKIP_REASONS
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
        self.ids_off = ids_off = ids.offsets.to_numpy().astype(np.int64)
        self.ids_flat = ids_flat = ids.values.to_numpy()
        n_tok = np.diff(self.ends_off)

        p_doc = positions.column("doc_id").to_pylist()
        self.n = len(p_doc)
        try:
            self.row = np.fromiter((row_of[d] for d in p_doc), dtype=np.int64, count=self.n)
        except KeyError as e:
            raise BadInput(
                f"{where}: position of document {e.args[0]!r}, which is not in the matching docs shard"
            ) from None
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
            raise BadInput(
                f"{where}: position {self.pos[bad]} of {p_doc[bad]!r} is outside its {n_tok[self.row[bad]]} tokens"
            )
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
        self.split_eval = np.array(
            [split_of(d, config.seed, config.eval_fraction) == "eval" for d in self.doc_ids], bool
        )
        self.pos_eval = self.split_eval[self.row] if self.n else np.zeros(0, bool)
        self.accept_mass = np.full(self.n, np.nan, np.float64)
        self.live = np.full(self.n, np.nan, np.float64)
        if self.logprob is not None and config.unit == "token":  # the estimate is for one-token predictions
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

    def _estimate_live(self, config: MakeTasksConfig, vocab: _Vocab | None) -> None:
        """accept_mass (q) and live for every position still eligible (`rptdata.tasks.live`)."""
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

    def token_at(self, r: int, pos: int) -> int:
        """The token id at position `pos` of the document in row `r`."""
        return int(self.ids_flat[self.ids_off[r] + pos])

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
    info = sm.get("tokenizer") or {}
    spec = info.get("spec") or info.get("name")
    if not spec:
        raise MissingUpstream(f"{scored}/{MANIFEST} names no tokenizer; the saved top-k tokens cannot be read")
    tokenizer = load_tokenizer(spec)
    check_tokenizer(
        info,
        {"spec": spec, "vocab_hash": vocab_hash(tokenizer)},
        built=f"{scored} was scored",
        user="the same name, loaded now,",
        harm="the saved top-k token ids would mean other tokens",
        fix="Score the corpus again (rpt score-entropy --overwrite)",
    )
    return _Vocab(tokenizer)


def _optional(table: pa.Table, name: str, dtype, n: int) -> np.ndarray | None:
    if name not in table.column_names:
        return None
    return table.column(name).to_numpy(zero_copy_only=False).astype(dtype)


# ---------------------------------------------------------------------------------------------
# the stage


@dataclass(frozen=True)
class Inputs:
    scored: Path
    prepared: Path
    scored_manifest: dict
    prepared_manifest: dict
    shards: list[int]
    vocab: _Vocab | None = None


def open_inputs(config: MakeTasksConfig) -> Inputs:
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
    check_tokenizer(
        sm.get("tokenizer"),
        pm.get("tokenizer") or {},
        built=f"{scored} was scored",
        user=str(prepared),
        harm="the token ids would not line up",
        fix="Pass --prepared with the prepared directory it was scored from, or score this one",
    )
    missing = [name for name in sm.get("shards", []) if not (scored / name).exists()]
    if missing:
        raise MissingUpstream(
            f"{scored}: the manifest lists {len(missing)} shard(s) that are not there, e.g. {missing[0]}"
        )
    shards = []
    for path in list_shards(scored / POSITIONS_DIR):
        index = shard_index(path)
        if not (prepared / DOCS_DIR / shard_name(index)).exists():
            raise MissingUpstream(f"{path} has no matching docs shard {prepared / DOCS_DIR / shard_name(index)}")
        shards.append(index)
    return Inputs(scored, prepared, sm, pm, shards, _load_vocab(sm, scored))


def load_shard(inputs: Inputs, index: int, config: MakeTasksConfig) -> Shard:
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
    shard = Shard(index, docs, positions, config, str(pos_path), inputs.vocab)
    if config.unit == "token":
        return shard
    from rptdata.tasks.units import UnitShard

    return UnitShard(shard, config)
