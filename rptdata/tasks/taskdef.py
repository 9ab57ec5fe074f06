"""What a task is: the context cut, the continuation, the document split rule, task ids, the schema.

    cut_context(text_bytes, ends, pos, n_tokens)  -> (context, tokens in it)
    continuation_at(text_bytes, ends, pos, k)     -> (continuation, boundaries)
    split_of(doc_id, seed, eval_fraction)         -> "train" | "eval"
    task_id_of(doc_id, pos)                       -> "doc@pos"

A task is one scored position t of a document (paper Sec. 3.1): the context is the document's
text before token t (at most `context_tokens` tokens, cut on a token boundary), the continuation
is the text of tokens t .. t+K-1, and `boundaries` are the cumulative UTF-8 byte lengths of those
tokens: the lengths a prediction may have under prefix matching (paper Eq. 3,
`rpttrain.reward.prefix_reward`). `rptdata.tasks` (`rpt make-tasks`) writes tasks with these
definitions; readers of a tasks directory (training, eval) recompute the split with `split_of`
and the rule the manifest records (`split_rule`, read back by `recorded_split_rule`). See docs/tasks.md for the schema.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import pyarrow as pa

__all__ = [
    "SPLITS",
    "SPLIT_HASH",
    "TASKS_SCHEMA",
    "UNIT_COLUMNS",
    "continuation_at",
    "cut_context",
    "recorded_split_rule",
    "split_of",
    "split_rule",
    "task_id_of",
]

SPLITS = ("train", "eval")
SPLIT_HASH = "sha256"

TASKS_SCHEMA = pa.schema(
    [
        ("task_id", pa.string()),
        ("doc_id", pa.string()),
        ("pos", pa.int32()),
        ("context", pa.string()),
        ("continuation", pa.string()),
        ("boundaries", pa.list_(pa.int32())),
        ("entropy", pa.float32()),
        ("band", pa.string()),
        ("target_id", pa.int32()),
        ("context_tokens", pa.int32()),
        ("target_logprob", pa.float32()),
        ("target_rank", pa.int32()),
        ("accept_mass", pa.float32()),  # q of rptdata.tasks.live: P(one sample at T is rewarded)
        ("live", pa.float32()),  # 1 - q^G - (1-q)^G: P(a group of G gets mixed rewards)
        # added with the units (rptdata.tasks.units); older task directories lack them and read as token tasks
        ("unit", pa.string()),  # token | sentence | masked-sentence | span
        ("start_byte", pa.int64()),  # where the continuation starts in the document's UTF-8 text
        ("context_after", pa.string()),  # masked units: the text right after the target
        ("entropy_first", pa.float32()),  # units: the entropy of the target's first token
        ("entropy_mean", pa.float32()),  # units: the mean entropy of its scored tokens
        ("scored_tokens", pa.int32()),  # units: how many of the tokens it overlaps were scored
    ]
)
# what a tasks directory made before units holds; `unit` missing means "token"
UNIT_COLUMNS = ("unit", "start_byte", "context_after", "entropy_first", "entropy_mean", "scored_tokens")


def _is_char_start(text_bytes: bytes, offset: int) -> bool:
    """True when `offset` is a character boundary of valid UTF-8 `text_bytes` (the end counts)."""
    return offset >= len(text_bytes) or (text_bytes[offset] & 0xC0) != 0x80


def _end(ends: Sequence[int], i: int) -> int:
    """Byte offset where token i ends; token -1 "ends" at 0."""
    return int(ends[i]) if i >= 0 else 0


def _context_start(text_bytes: bytes, ends: Sequence[int], pos: int, n_tokens: int) -> int:
    """First token of the context window: pos - n_tokens (at least 0), moved forward while its
    start byte falls inside a multi-byte character. Equals `pos` when no whole character fits."""
    start = max(0, pos - n_tokens)
    while start < pos and not _is_char_start(text_bytes, _end(ends, start - 1)):
        start += 1
    return start


def cut_context(text_bytes: bytes, ends: Sequence[int], pos: int, n_tokens: int) -> tuple[str, int]:
    """The text before token `pos`, cut to at most `n_tokens` whole tokens; and their count.

    `text_bytes` is a document's UTF-8 text and `ends` its `token_end_bytes` (token i spans
    bytes [ends[i-1], ends[i]), with ends[-1] = 0). The context starts on a token boundary;
    when that boundary falls inside a multi-byte character (a byte-level BPE token holding
    part of one), it moves forward to the next token boundary that is a character boundary,
    so the context may hold fewer than `n_tokens` tokens, or none ("", 0).

    Raises ValueError when the context would end inside a character (such positions cannot
    end a text context; `run_make_tasks` skips them as `mid_character`).

    >>> text = "ab 世".encode()          # 世 is 3 bytes: e4 b8 96
    >>> ends = [2, 3, 4, 6]              # "ab", " ", then 世 split over two tokens
    >>> cut_context(text, ends, 2, 8)
    ('ab ', 2)
    >>> cut_context(text, ends, 2, 1)
    (' ', 1)
    >>> cut_context("ab 世!".encode(), [2, 3, 4, 6, 7], 4, 1)  # window starts inside 世
    ('', 0)
    """
    if not 0 <= pos <= len(ends):
        raise ValueError(f"position {pos} is outside the document's {len(ends)} tokens")
    stop = _end(ends, pos - 1)
    if not _is_char_start(text_bytes, stop):
        raise ValueError(f"position {pos}: the context would end inside a multi-byte character (byte {stop})")
    start = _context_start(text_bytes, ends, pos, n_tokens)
    return text_bytes[_end(ends, start - 1) : stop].decode("utf-8"), pos - start


def continuation_at(text_bytes: bytes, ends: Sequence[int], pos: int, k: int) -> tuple[str, list[int]]:
    """The text of the `k` tokens from `pos` on, and the cumulative byte lengths of those tokens.

    The document's end may cut the continuation shorter. When the k-th token ends inside a
    multi-byte character, the continuation shrinks to the last token boundary that is a
    character boundary; if no such boundary is left, it grows to the first one after. So the
    continuation is always whole characters, and `boundaries` is strictly increasing with
    `boundaries[-1] == len(continuation.encode())`. Token ends that fall inside a character stay
    in `boundaries`: they are real token boundaries, no string can match them, and the first
    one keeps its meaning for the first-token reward.

    The continuation must start on a character boundary (ValueError otherwise).

    >>> continuation_at(b"x = 12", [1, 3, 5, 6], 1, 2)
    (' = 1', [2, 4])
    >>> text = "a世b".encode()          # 世 is 3 bytes, here split into two tokens
    >>> continuation_at(text, [1, 3, 4, 5], 1, 1)   # one token would end inside 世: extend
    ('世', [2, 3])
    >>> continuation_at(text, [1, 3, 4, 5], 1, 3)
    ('世b', [2, 3, 4])
    >>> continuation_at(text, [1, 3, 4, 5], 0, 2)   # shrink back to the last whole character
    ('a', [1])
    """
    n = len(ends)
    if not 0 <= pos < n:
        raise ValueError(f"position {pos} is outside the document's {n} tokens")
    if k < 1:
        raise ValueError(f"a continuation needs at least one token, not k={k}")
    start = _end(ends, pos - 1)
    if not _is_char_start(text_bytes, start):
        raise ValueError(f"position {pos}: the continuation would start inside a multi-byte character")
    last = min(pos + k, n) - 1
    j = last
    while j >= pos and not _is_char_start(text_bytes, _end(ends, j)):
        j -= 1
    if j < pos:  # no whole character within k tokens: extend to the first character boundary
        j = last + 1
        while not _is_char_start(text_bytes, _end(ends, j)):
            j += 1  # ends[-1] == len(text) is a boundary, so this stops
    boundaries: list[int] = []
    for i in range(pos, j + 1):
        b = int(ends[i]) - start
        if not boundaries or b > boundaries[-1]:  # a zero-length token adds no boundary
            boundaries.append(b)
    return text_bytes[start : start + boundaries[-1]].decode("utf-8"), boundaries


def _unit_hash(key: str) -> float:
    """A stable number in [0, 1): the first 53 bits of SHA-256(key)."""
    return (int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") >> 11) / 2**53


def split_of(doc_id: str, seed: int = 0, eval_fraction: float = 0.1) -> str:
    """ "eval" or "train" for a document, from a seeded SHA-256 of its id (stable across runs,
    machines and Python versions; unlike `hash()`).

    The rule: u = first 8 bytes of sha256(f"{seed}:{doc_id}") as a big-endian integer, >> 11,
    / 2**53; the document is "eval" when u < eval_fraction.

    >>> split_of("doc-1", seed=0, eval_fraction=0.0), split_of("doc-1", seed=0, eval_fraction=1.0)
    ('train', 'eval')
    """
    return "eval" if _unit_hash(f"{seed}:{doc_id}") < eval_fraction else "train"


def split_rule(seed: int, eval_fraction: float) -> dict:
    """The split rule as make-tasks records it in its manifest ("split"), so later stages can
    recompute it with `split_of(doc_id, rule["seed"], rule["eval_fraction"])`."""
    return {
        "hash": SPLIT_HASH,
        "key": "f'{seed}:{doc_id}'",
        "value": "int.from_bytes(sha256(key).digest()[:8], 'big') >> 11, / 2**53",
        "eval_if": "value < eval_fraction",
        "seed": seed,
        "eval_fraction": eval_fraction,
        "function": "rptdata.tasks.taskdef.split_of",
    }


def recorded_split_rule(tasks_manifest: dict | None) -> dict | None:
    """The split rule a tasks manifest records, rebuilt with `split_rule` (so two rules compare by
    hash, seed and fraction alone); None when it records none, or one `split_of` cannot recompute.

    >>> rule = recorded_split_rule({"split": {"hash": "sha256", "seed": 1, "eval_fraction": 0.25}})
    >>> rule == split_rule(1, 0.25)
    True
    >>> recorded_split_rule({"split": {"seed": 1}}) is None   # no fraction
    True
    >>> recorded_split_rule({"split": {"hash": "md5", "seed": 1, "eval_fraction": 0.25}}) is None
    True
    """
    split = (tasks_manifest or {}).get("split") or {}
    if split.get("hash") != SPLIT_HASH or split.get("seed") is None or split.get("eval_fraction") is None:
        return None
    return split_rule(split["seed"], split["eval_fraction"])


def task_id_of(doc_id: str, pos: int) -> str:
    """The stable id of the task at a position: "{doc_id}@{pos}".

    >>> task_id_of("omnimath-17", 42)
    'omnimath-17@42'
    """
    return f"{doc_id}@{pos}"
