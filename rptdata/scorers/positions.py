"""Scoring documents into position rows: the windows a document is cut into, and one shard's
positions table (`score_docs`). The stage around it (shards, markers, manifest) is
`rptdata.score`; the engines are this package's scorers.

    table, counts = score_docs(scorer, doc_ids, token_arrays, max_context=512, threshold=None)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import pyarrow as pa

from rptdata.errors import BadOption
from rptdata.scorers import Scorer, plan_chunks

DEFAULT_THRESHOLD = 0.5
POSITIONS_SCHEMA = pa.schema(
    [
        ("doc_id", pa.string()),
        ("pos", pa.int32()),
        ("token_id", pa.int32()),
        ("entropy", pa.float32()),
        ("target_logprob", pa.float32()),
        ("target_rank", pa.int32()),
        ("top1_id", pa.int32()),
    ]
)
TOPK_FIELDS = [("topk_ids", pa.list_(pa.int32())), ("topk_logprobs", pa.list_(pa.float32()))]
_SCORE_FIELDS = ("entropy", "target_logprob", "target_rank", "top1_id")
_TOPK_NAMES = ("topk_ids", "topk_logprobs")

# ---------------------------------------------------------------------------------------------
# windows (pure)


class Window(NamedTuple):
    """Tokens [start, end) of a document go to the model; positions [first, end) are scored."""

    start: int
    first: int
    end: int


def default_overlap(max_context: int, min_context: int) -> int:
    return max(min_context, max_context // 2)


@dataclass(frozen=True)
class ScoreWindow:
    """What a scored position can see, resolved and checked in one place: a window of at most
    `max_context` tokens (context + target), at least `min_context` tokens of context, and
    `overlap` tokens carried into each later window (None: max(min_context, max_context // 2)).

    >>> ScoreWindow(2048, 1)
    ScoreWindow(max_context=2048, min_context=1, overlap=1024)
    >>> ScoreWindow(8, 4, overlap=2)
    Traceback (most recent call last):
    ...
    rptdata.errors.BadOption: --overlap 2 must be in [4, 7] (--min-context .. --max-context - 1): later windows carry that much context
    """

    max_context: int
    min_context: int = 1
    overlap: int | None = None

    def __post_init__(self):
        check_context_options(self.min_context, self.max_context, self.overlap)
        if self.overlap is None:
            object.__setattr__(self, "overlap", default_overlap(self.max_context, self.min_context))


def check_context_options(min_context: int, max_context: int | None, overlap: int | None) -> None:
    """BadOption unless the options can make a window; `max_context` None (the model's, not known
    yet) checks what it can: the window itself is checked when it is resolved (`ScoreWindow`)."""
    if min_context < 1:
        raise BadOption("--min-context must be at least 1: a position needs some context (no BOS is added)")
    if max_context is not None and max_context <= min_context:
        raise BadOption(
            f"--max-context ({max_context}) must exceed --min-context ({min_context}): "
            "a window holds the context and the target"
        )
    top = max_context - 1 if max_context is not None else None
    if overlap is not None and (overlap < min_context or (top is not None and overlap > top)):
        raise BadOption(
            f"--overlap {overlap} must be in [{min_context}, {top if top is not None else 'max-context - 1'}] "
            "(--min-context .. --max-context - 1): later windows carry that much context"
        )


def plan_windows(n_tokens: int, max_context: int, min_context: int = 1, overlap: int | None = None) -> list[Window]:
    """Cover positions [min_context, n_tokens) with windows of at most `max_context` tokens.

    The first window starts at 0. Each later window carries `overlap` tokens of context before
    its first scored position, except the last, which starts earlier so that it is full. So
    every position is scored exactly once, with at least min(pos, overlap) tokens of context.

    >>> plan_windows(10, max_context=4, min_context=1, overlap=2)
    [Window(start=0, first=1, end=4), Window(start=2, first=4, end=6), Window(start=4, first=6, end=8), Window(start=6, first=8, end=10)]
    >>> plan_windows(1, max_context=4)  # a one-token document has no position with context
    []
    """
    overlap = ScoreWindow(max_context, min_context, overlap).overlap
    if n_tokens <= min_context:
        return []
    windows = [Window(0, min_context, min(n_tokens, max_context))]
    while windows[-1].end < n_tokens:
        first = windows[-1].end
        start = min(first - overlap, n_tokens - max_context)
        windows.append(Window(start, first, min(n_tokens, start + max_context)))
    return windows


# ---------------------------------------------------------------------------------------------
# scoring one shard's documents


def score_docs(
    scorer: Scorer,
    doc_ids: Sequence[str],
    tokens: Sequence[np.ndarray],
    *,
    max_context: int,
    min_context: int = 1,
    overlap: int | None = None,
    threshold: float | None = DEFAULT_THRESHOLD,
    save_topk: bool = False,
    long_documents: str | None = None,
    progress=None,
) -> tuple[pa.Table, dict]:
    """Score every position of these documents; keep rows with entropy >= threshold (None: all).

    Documents longer than `max_context` go in chunks that carry the key/value cache
    (`long_documents="kv-carry"`, where the scorer can) or in overlapping windows ("windows");
    None picks what the scorer can do. Returns the positions table (rows in document order, then
    by pos) and the shard's counts.
    """
    overlap = default_overlap(max_context, min_context) if overlap is None else overlap
    long_documents = long_documents or long_document_method(scorer.name, getattr(scorer, "carries_kv", False))
    if long_documents == "kv-carry" and not getattr(scorer, "carries_kv", False):
        raise BadOption(f"the {scorer.name} scorer cannot carry a key/value cache; score long documents in windows")
    carried = _carried_docs(scorer, tokens, max_context) if long_documents == "kv-carry" else set()
    # units, in (document, first position) order: a window of a document, or a whole carried document
    owner, firsts, seqs, unit_of = [], [], [], {}
    n_windows = tokens_forwarded = 0
    for d, toks in enumerate(tokens):
        if d in carried:
            if len(toks) > min_context:
                unit_of[("doc", d)] = len(owner)
                owner.append(d)
                firsts.append(min_context)
                n_windows += len(plan_chunks(len(toks), max_context - overlap, max_context, min_context, max_context))
                tokens_forwarded += len(toks) - 1
            continue
        for w in plan_windows(len(toks), max_context, min_context, overlap):
            unit_of[("win", len(seqs))] = len(owner)
            owner.append(d)
            firsts.append(w.first)
            seqs.append((toks[w.start : w.end], w.first - w.start))
            n_windows += 1
            tokens_forwarded += w.end - w.start - 1
    names = _SCORE_FIELDS + (_TOPK_NAMES if save_topk else ())
    kept: list = [None] * len(owner)  # per unit: {"pos": ..., field: array}, filtered
    n_scored = 0

    def keep(unit: int, scores) -> None:
        nonlocal n_scored
        n_scored += len(scores)
        cols = {"pos": firsts[unit] + np.arange(len(scores), dtype=np.int64)}
        cols.update((name, getattr(scores, name)) for name in names)
        if threshold is not None:
            mask = scores.entropy >= threshold
            cols = {name: col[mask] for name, col in cols.items()}
        kept[unit] = cols

    for i, scores in scorer.score([s for s, _ in seqs], [f for _, f in seqs], progress=progress):
        keep(unit_of[("win", i)], scores)
    if carried:
        docs = sorted(carried)
        for i, scores in scorer.score_carried(
            [tokens[d] for d in docs],
            chunk=max_context - overlap,
            max_context=max_context,
            min_context=min_context,
            first_end=max_context,
            progress=progress,
        ):
            keep(unit_of[("doc", docs[i])], scores)
    if any(c is None for c in kept):  # the scorer contract: every sequence exactly once
        raise AssertionError("the scoring scorer left sequences unscored")

    keep_counts = np.array([len(c["pos"]) for c in kept], dtype=np.int64)
    doc_index = np.repeat(np.array(owner, dtype=np.int64), keep_counts)

    def cat(name, dtype, width=None):
        if not kept:
            return np.zeros((0,) if width is None else (0, width), dtype)
        return np.concatenate([c[name] for c in kept]).astype(dtype)

    pos = cat("pos", np.int64)
    lengths = np.array([len(t) for t in tokens], dtype=np.int64)
    flat = np.concatenate([np.asarray(t) for t in tokens]) if len(tokens) else np.zeros(0, np.int32)
    token_id = flat[np.concatenate([[0], np.cumsum(lengths)])[doc_index] + pos] if len(pos) else np.zeros(0)
    columns = [
        pa.array(list(doc_ids), pa.string()).take(pa.array(doc_index, pa.int64())),
        pa.array(pos.astype(np.int32), pa.int32()),
        pa.array(token_id.astype(np.int32), pa.int32()),
        pa.array(cat("entropy", np.float32), pa.float32()),
        pa.array(cat("target_logprob", np.float32), pa.float32()),
        pa.array(cat("target_rank", np.int32), pa.int32()),
        pa.array(cat("top1_id", np.int32), pa.int32()),
    ]
    schema = POSITIONS_SCHEMA
    if save_topk:
        k = scorer.top_k
        offsets = pa.array(np.arange(0, (len(pos) + 1) * k, k, dtype=np.int32))
        columns += [
            pa.ListArray.from_arrays(offsets, pa.array(cat("topk_ids", np.int32, k).reshape(-1), pa.int32())),
            pa.ListArray.from_arrays(offsets, pa.array(cat("topk_logprobs", np.float32, k).reshape(-1), pa.float32())),
        ]
        schema = pa.schema(list(POSITIONS_SCHEMA) + [pa.field(n, t) for n, t in TOPK_FIELDS])
    table = pa.Table.from_arrays(columns, schema=schema)

    stats = {
        "documents": len(tokens),
        "documents_without_positions": int((lengths <= min_context).sum()),
        "positions_scored": int(n_scored),
        "positions_kept": int(len(pos)),
        "positions_below_threshold": int(n_scored - len(pos)),
        "positions_skipped_short_context": int(np.minimum(lengths, min_context).sum()),
        "windows": n_windows,
        "tokens_forwarded": int(tokens_forwarded),
    }
    if stats["positions_scored"] + stats["positions_skipped_short_context"] != int(lengths.sum()):
        raise AssertionError("position accounting broke: scored + skipped != tokens")  # internal invariant
    return table, stats


def _carried_docs(scorer, tokens, max_context: int) -> set[int]:
    """The documents scored with a carried key/value cache: longer than the window (shorter ones
    fit one window, which already forwards each token once) and within the model's positions
    (position ids are absolute; longer documents fall back to windows)."""
    limit = getattr(scorer, "max_positions", None) or float("inf")
    return {d for d, t in enumerate(tokens) if max_context < len(t) <= limit}


def long_document_method(engine_name: str, carries_kv: bool) -> str:
    """How documents longer than the window are scored: "kv-carry" (the transformers scorer, each
    token once) or "windows" (vLLM, and models whose cache cannot be carried).

    >>> long_document_method("vllm", False), long_document_method("hf", True)
    ('windows', 'kv-carry')
    """
    return "kv-carry" if engine_name == "hf" and carries_kv else "windows"
