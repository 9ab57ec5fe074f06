"""What is predicted when it is not the next token: a sentence (RLPT's ASR), a masked sentence
(RLPT's MSR) or a masked span of words (PretrainZero), and one shard's candidates of each.

    sentence_spans(text)                   -> [(start, end), ...] char offsets covering the text
    paragraph_spans(text)                  -> [(start, end), ...] char offsets of non-blank paragraphs
    word_spans(text, start, end)           -> [(start, end), ...] char offsets of the words in a range
    covered_tokens(ends, start, end)       -> (first, last) token indices overlapping a byte range
    target_boundaries(ends, start, end)    -> the prefix lengths that end on a token boundary
    UnitShard(shard, config)               -> the candidates of one shard, each with its fate

A unit task is a byte range [start, end) of a document: `context` is the text before it (at most
`context_tokens` whole tokens, plus the part of the token the target starts inside, if any),
`continuation` is the target itself and, for the masked units, `context_after` the text after it
(the next sentence, or the rest of the span's paragraph; at most `context_after_tokens` tokens).
The three are consecutive slices of the document's UTF-8 bytes, cut on character boundaries, so
context + continuation + context_after is always a substring of the document: no byte is
changed, dropped or added.

Sentences come from nupunkt (`nupunkt.sent_spans`; why nupunkt: docs/tasks.md, "Choosing the
sentence splitter"), plus a boundary after every blank line, minus every boundary that falls
inside a LaTeX math span ($...$, $$...$$, \\[...\\], \\(...\\)). A sentence keeps the whitespace
after it, as nupunkt gives it.

Difficulty: the entropies of the scored tokens a target overlaps; `entropy_first` is the first
one's, `entropy_mean` their mean, and `entropy` (which --threshold and the bands read) is the one
`unit_entropy` names.

Left out on purpose: RLPT's segment merging (several short sentences into one segment), and
PretrainZero's learned mask generator (its spans are chosen by a policy; here at random or at the
highest-entropy words).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence

import numpy as np

from rptdata.tasks.taskdef import _context_start, _end, _is_char_start

UNITS = ("token", "sentence", "span")
SPAN_SELECT = ("random", "entropy")
UNIT_ENTROPY = ("mean", "first")
# the reasons a unit candidate (a sentence, or a span slot of a paragraph) makes no task
UNIT_SKIP_REASONS = (
    "first_sentence",  # the document's first sentence: nothing before it to predict from (RLPT: i >= 2)
    "short_sentence",  # fewer than --min-sentence-words words
    "long_target",  # a sentence of more than --max-target-tokens tokens
    "no_next_sentence",  # --masked: the document's last sentence has no sentence after it
    "no_unique_span",  # no span of 1..--span-words words that occurs once in its paragraph
    "nan_entropy",  # none of the target's tokens was scored
    "below_threshold",  # entropy < --threshold
    "empty_context",  # the context window holds no whole character
    "over_max_tasks",
    "over_max_eval_tasks",
)
SPAN_ATTEMPTS = 16  # start words tried per span slot before it counts as no_unique_span

_MATH = re.compile(r"\$\$.+?\$\$|\$[^$]+?\$|\\\[.+?\\\]|\\\(.+?\\\)", re.S)
_BLANK_LINE = re.compile(r"\n[ \t]*\n\s*")
_WORD = re.compile(r"\w+(?:['’-]\w+)*")


def unit_name(unit: str, masked: bool) -> str:
    """The name the manifest and every task row carry: token, sentence, masked-sentence or span.

    >>> unit_name("sentence", True), unit_name("span", True), unit_name("token", False)
    ('masked-sentence', 'span', 'token')
    """
    return "masked-sentence" if unit == "sentence" and masked else unit


def math_spans(text: str) -> list[tuple[int, int]]:
    """Char ranges of LaTeX math: $$...$$, $...$, \\[...\\], \\(...\\) (left to right, not nested).

    >>> math_spans("a $x. y$ b \\\\[ z. \\\\] c")
    [(2, 8), (11, 19)]
    """
    return [m.span() for m in _MATH.finditer(text)]


def _inside(spans: Sequence[tuple[int, int]], offset: int) -> bool:
    return any(a < offset < b for a, b in spans)


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """Sentences as char ranges that cover `text` exactly (each one's end is the next one's start).

    nupunkt's boundaries, plus one after every blank line, minus those inside LaTeX math.

    >>> t = "Let $x = 1.5$. Then e.g. $y. z$ holds.\\n\\n### Part 2\\nDone."
    >>> [t[a:b] for a, b in sentence_spans(t)]
    ['Let $x = 1.5$. ', 'Then e.g. $y. z$ holds.\\n\\n', '### Part 2\\nDone.']
    """
    from nupunkt import sent_spans

    if not text:
        return []
    cuts = {end for _, end in sent_spans(text)} | {m.end() for m in _BLANK_LINE.finditer(text)}
    maths = math_spans(text)
    starts = sorted(c for c in cuts if 0 < c < len(text) and not _inside(maths, c))
    edges = [0, *starts, len(text)]
    return list(zip(edges[:-1], edges[1:]))


def paragraph_spans(text: str) -> list[tuple[int, int]]:
    """Char ranges of the paragraphs: the text between blank lines, without the blank lines.

    >>> t = "One two.\\n\\nThree\\n \\nfour"
    >>> [t[a:b] for a, b in paragraph_spans(t)]
    ['One two.', 'Three', 'four']
    """
    out, start = [], 0
    for m in _BLANK_LINE.finditer(text):
        if m.start() > start:
            out.append((start, m.start()))
        start = m.end()
    if start < len(text):
        out.append((start, len(text)))
    return out


def word_spans(text: str, start: int = 0, end: int | None = None) -> list[tuple[int, int]]:
    """Char ranges of the words in text[start:end]: runs of letters, digits and underscores, joined
    by an inner hyphen or apostrophe.

    >>> t = "Let $x^2$ be well-known, isn't it?"
    >>> [t[a:b] for a, b in word_spans(t)]
    ['Let', 'x', '2', 'be', 'well-known', "isn't", 'it']
    """
    return [m.span() for m in _WORD.finditer(text, start, len(text) if end is None else end)]


def count_words(text: str) -> int:
    """
    >>> count_words("Thus $x = 5$."), count_words("1.")
    (3, 1)
    """
    return sum(1 for _ in _WORD.finditer(text))


def occurrences(haystack: bytes, needle: bytes) -> int:
    """How often `needle` occurs in `haystack`, overlaps included.

    >>> occurrences(b"aaa", b"aa"), occurrences(b"a cat, a cat", b"cat"), occurrences(b"x", b"y")
    (2, 2, 0)
    """
    n, i = 0, haystack.find(needle)
    while i >= 0:
        n += 1
        i = haystack.find(needle, i + 1)
    return n


def byte_offsets(text: str, char_offsets: Sequence[int]) -> list[int]:
    """UTF-8 byte offsets of increasing char offsets of `text` (ValueError if they decrease).

    >>> byte_offsets("añb", [0, 1, 2, 3])
    [0, 1, 3, 4]
    """
    out, byte, prev = [], 0, 0
    for c in char_offsets:
        if c < prev:
            raise ValueError(f"char offsets must not decrease: {c} after {prev}")
        byte += len(text[prev:c].encode("utf-8"))
        prev = c
        out.append(byte)
    return out


def covered_tokens(ends: Sequence[int] | np.ndarray, start: int, end: int) -> tuple[int, int]:
    """(first, last): the tokens that overlap bytes [start, end), by their `token_end_bytes`.

    >>> covered_tokens([3, 5, 9], 4, 7)    # tokens [0,3) [3,5) [5,9)
    (1, 2)
    >>> covered_tokens([3, 5, 9], 3, 5)
    (1, 1)
    """
    ends = np.asarray(ends)
    first = int(np.searchsorted(ends, start, side="right"))
    last = int(np.searchsorted(ends, end, side="left"))
    return first, min(last, len(ends) - 1)


def target_boundaries(ends: Sequence[int] | np.ndarray, start: int, end: int) -> list[int]:
    """The prefix lengths of bytes [start, end) that end on a token boundary, and the whole length.

    These are a unit task's `boundaries`: `rpttrain.reward.prefix_reward` accepts a prediction
    whose bytes are a prefix of the target ending at one of them.

    >>> target_boundaries([3, 5, 9], 4, 9)
    [1, 5]
    >>> target_boundaries([3, 5, 9], 4, 7)
    [1, 3]
    """
    inside = [int(e) - start for e in ends if start < e < end]
    return [*inside, end - start]


def context_before(text_bytes: bytes, ends: np.ndarray, start: int, n_tokens: int) -> tuple[int, int]:
    """(first byte, whole tokens) of the context before byte `start`: the tokens before the one
    `start` falls in (at most `n_tokens`, starting on a character boundary, as `cut_context`), plus
    that token's bytes before `start`.

    >>> ends = np.array([3, 4, 8])                  # "ab." " " "Next"
    >>> context_before(b"ab. Next", ends, 4, 8), context_before(b"ab. Next", ends, 4, 1)
    ((0, 2), (3, 1))
    """
    first = int(np.searchsorted(ends, start, side="right"))  # the token `start` falls in
    cstart = _context_start(text_bytes, ends, first, n_tokens)
    return _end(ends, cstart - 1), first - cstart


def cut_after(text_bytes: bytes, ends: np.ndarray, start: int, stop: int, n_tokens: int) -> int:
    """Where a `context_after` from byte `start` ends: at `stop`, or earlier at the end of the
    `n_tokens`-th token that starts at or after `start`, moved back to a character boundary.

    >>> cut_after(b"ab. Next one", np.array([3, 4, 8, 12]), 3, 12, 2)
    8
    """
    first = int(np.searchsorted(ends, start, side="right"))
    if first + n_tokens - 1 < len(ends):
        stop = min(stop, int(ends[first + n_tokens - 1]))
    while stop > start and not _is_char_start(text_bytes, stop):
        stop -= 1
    return stop


def _rng(seed: int, doc_id: str, paragraph: int) -> np.random.Generator:
    key = int.from_bytes(hashlib.sha256(f"{seed}:span:{doc_id}:{paragraph}".encode()).digest()[:8], "big")
    return np.random.default_rng(key)


def pick_spans(
    para: bytes,
    words: Sequence[tuple[int, int]],
    order: Sequence[int],
    slots: int,
    max_words: int,
    rng: np.random.Generator,
) -> list[tuple[int, int] | None]:
    """Up to `slots` non-overlapping spans of whole words of one paragraph, each occurring once in it.

    `words` are byte ranges within `para`; `order` lists start words in the order to try them
    (random, or by entropy). For each start word a length k is drawn uniformly from 1..max_words,
    then k, k+1, ..., max_words words are tried; the first span whose bytes occur exactly once in
    the paragraph, and hold no line break, is taken. A slot tries at most SPAN_ATTEMPTS start words; one that finds none is
    None. Returns (first word, last word) index pairs.

    >>> para = b"the cat saw the dog"
    >>> w = [(0, 3), (4, 7), (8, 11), (12, 15), (16, 19)]
    >>> pick_spans(para, w, [0, 1], 1, 1, np.random.default_rng(0))   # "the" occurs twice
    [(1, 1)]
    """
    taken: list[tuple[int, int]] = []
    out: list[tuple[int, int] | None] = []
    queue = list(order)
    for _ in range(slots):
        found = None
        for _attempt in range(SPAN_ATTEMPTS):
            if not queue:
                break
            first = queue.pop(0)
            k = int(rng.integers(1, max_words + 1))
            for n in range(k, max_words + 1):
                last = first + n - 1
                if last >= len(words) or any(a <= last and first <= b for a, b in taken):
                    break
                span = para[words[first][0] : words[last][1]]
                if b"\n" in span:  # one line: a span across a line break is mostly markup (display math, lists)
                    break
                if occurrences(para, span) == 1:
                    found = (first, last)
                    break
            if found:
                break
        if found:
            taken.append(found)
        out.append(found)
    return out


class UnitShard:
    """The unit candidates of one shard (a joined docs + positions `Shard`), with their fates.

    The attributes mirror `rptdata.tasks.inputs.Shard` where `rptdata.tasks.build` reads them
    (`n`, `row`, `reason`, `pos_eval`, `live`, `eligible()`, `task_id(i)`); `reasons` names the
    reason codes. A candidate is a sentence (unit sentence) or a span slot of a paragraph (unit
    span); candidates are held as byte offsets, and their text is cut only when a task is written.
    """

    reasons = UNIT_SKIP_REASONS

    def __init__(self, shard, config):
        self.shard = shard
        self.index = shard.index
        self.doc_ids = shard.doc_ids
        self.unit = unit_name(config.unit, config.masked)
        cols: dict[str, list] = {k: [] for k in ("row", "start", "end", "after", "pos", "first", "mean", "nscored")}
        reasons: list[int] = []
        entropy_of = _entropies_by_doc(shard)
        for r, doc_id in enumerate(shard.doc_ids):
            text_bytes, ends = shard.doc_bytes(r)
            text = text_bytes.decode("utf-8")
            ent = entropy_of(r, len(ends))
            for start, end, after, why in self._candidates(text, text_bytes, ends, doc_id, ent, config):
                cols["row"].append(r)
                cols["start"].append(start)
                cols["end"].append(end)
                cols["after"].append(after)
                if why is None and start < end:
                    first, last = covered_tokens(ends, start, end)
                    covered = ent[first : last + 1]
                    scored = covered[~np.isnan(covered)]
                    cols["pos"].append(first)
                    cols["first"].append(covered[0])
                    cols["mean"].append(float(scored.mean()) if len(scored) else np.nan)
                    cols["nscored"].append(len(scored))
                    cstart, n_ctx = context_before(text_bytes, ends, start, config.context_tokens)
                    if cstart >= start:
                        why = "empty_context"
                else:
                    cols["pos"].append(0)
                    cols["first"].append(np.nan)
                    cols["mean"].append(np.nan)
                    cols["nscored"].append(0)
                reasons.append(0 if why is None else UNIT_SKIP_REASONS.index(why) + 1)
        self.n = len(reasons)
        self.row = np.asarray(cols["row"], np.int64)
        self.start = np.asarray(cols["start"], np.int64)
        self.end = np.asarray(cols["end"], np.int64)
        self.after = np.asarray(cols["after"], np.int64)
        self.pos = np.asarray(cols["pos"], np.int64)
        self.entropy_first = np.asarray(cols["first"], np.float64)
        self.entropy_mean = np.asarray(cols["mean"], np.float64)
        self.n_scored = np.asarray(cols["nscored"], np.int64)
        self.entropy = self.entropy_mean if config.unit_entropy == "mean" else self.entropy_first
        self.reason = np.asarray(reasons, np.int8)
        open_ = self.reason == 0
        self._mark(open_ & np.isnan(self.entropy), "nan_entropy")
        self._mark(self.entropy < config.threshold, "below_threshold")
        self.pos_eval = shard.split_eval[self.row] if self.n else np.zeros(0, bool)
        self.live = np.full(self.n, np.nan)

    def _mark(self, mask: np.ndarray, reason: str) -> None:
        with np.errstate(invalid="ignore"):
            self.reason[(self.reason == 0) & mask] = UNIT_SKIP_REASONS.index(reason) + 1

    def _candidates(self, text, text_bytes, ends, doc_id, ent, config):
        """(start byte, end byte, context_after end byte or -1, skip reason or None) per candidate."""
        if config.unit == "sentence":
            yield from _sentence_candidates(text, text_bytes, ends, config)
        else:
            yield from _span_candidates(text, text_bytes, ends, doc_id, ent, config)

    def eligible(self) -> np.ndarray:
        return np.nonzero(self.reason == 0)[0]

    def task_id(self, i: int) -> str:
        return f"{self.doc_ids[self.row[i]]}@{self.unit}:{int(self.start[i])}"

    def doc_bytes(self, r: int):
        return self.shard.doc_bytes(r)


def _entropies_by_doc(shard):
    """A function (doc row, tokens) -> the entropy of each token of that document (NaN: not scored)."""
    order = np.argsort(shard.row, kind="stable")
    rows = shard.row[order]
    bounds = np.searchsorted(rows, np.arange(len(shard.doc_ids) + 1))

    def entropies(r: int, n_tokens: int) -> np.ndarray:
        ent = np.full(n_tokens, np.nan)
        idx = order[bounds[r] : bounds[r + 1]]
        ent[shard.pos[idx]] = shard.entropy[idx]
        return ent

    return entropies


def _sentence_candidates(text, text_bytes, ends, config):
    spans = sentence_spans(text)
    if not spans:
        return
    edges = byte_offsets(text, [a for a, _ in spans] + [len(text)])
    for i, (a, b) in enumerate(spans):
        start, end = edges[i], edges[i + 1]
        after = -1
        why = None
        if config.masked and i + 1 < len(spans):
            after = cut_after(text_bytes, ends, end, edges[i + 2], config.context_after_tokens)
        if i == 0:
            why = "first_sentence"
        elif count_words(text[a:b]) < config.min_sentence_words:
            why = "short_sentence"
        elif config.masked and i + 1 == len(spans):
            why = "no_next_sentence"
        else:
            first, last = covered_tokens(ends, start, end)
            if last - first + 1 > config.max_target_tokens:
                why = "long_target"
        yield start, end, after, why


def _span_candidates(text, text_bytes, ends, doc_id, ent, config):
    for p, (pa_, pb) in enumerate(paragraph_spans(text)):
        words = word_spans(text, pa_, pb)
        if not words:
            continue
        offs = byte_offsets(text, [pa_, *(x for w in words for x in w), pb])  # increasing, as it needs
        p0, p1 = offs[0], offs[-1]
        wbytes = [(offs[2 * j + 1] - p0, offs[2 * j + 2] - p0) for j in range(len(words))]
        rng = _rng(config.seed, doc_id, p)
        # a span never starts the document: it would have no context
        starts = [j for j in range(len(words)) if p0 + wbytes[j][0] > 0]
        if config.span_select == "random":
            order = [starts[j] for j in rng.permutation(len(starts))]
        else:  # the highest-entropy words first: the entropy of the token each word starts in
            first_ent = [ent[covered_tokens(ends, p0 + wbytes[j][0], p0 + wbytes[j][1])[0]] for j in starts]
            order = [starts[j] for j in sorted(range(len(starts)), key=lambda j: -np.nan_to_num(first_ent[j], nan=-1))]
        para = text_bytes[p0:p1]
        for found in pick_spans(para, wbytes, order, config.spans_per_paragraph, config.span_words, rng):
            if found is None:
                yield p0, p0, -1, "no_unique_span"
                continue
            start, end = p0 + wbytes[found[0]][0], p0 + wbytes[found[1]][1]
            yield start, end, cut_after(text_bytes, ends, end, p1, config.context_after_tokens), None
