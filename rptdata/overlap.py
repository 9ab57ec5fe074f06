"""The contamination guard of `rpt answer-tasks --exclude-overlap PREP_DIR`: which problems share a
passage with a prepared corpus (what a pretraining-stage run trained on), so they can be kept out
of the RLVR evaluation.

    index = NgramIndex(["Natalia sold clips to 48 of her friends ...", ...])   # the eval problems
    index.scan_prepared("out/prep")            # streams the corpus; any number of corpora
    index.hits                                 # per problem: True when it overlaps

The rule (docs/table2.md): a text's words are the runs of Unicode word characters (`\\w+`) of its
NFC, lower-cased form, so punctuation, spacing and LaTeX backslashes do not matter. A problem
overlaps a corpus when one of its word 13-grams occurs inside one document of the corpus; a problem
of fewer than 13 words overlaps when all its words occur, in order and adjacent, inside one
document. (13-grams are the contamination unit of GPT-3's and most later decontamination reports.)

At corpus scale: each distinct word is hashed once (BLAKE2b, 64 bits, cached), an n-gram is a
polynomial of its words' hashes mod 2^64, computed for a whole batch of documents at once with
numpy (windows that cross a document boundary are dropped). The problems' n-gram hashes are one
sorted array, and each batch of corpus n-grams is looked up in it with `np.isin`: memory is the
problems' n-grams plus one batch of documents, time is linear in the corpus's words; no pairwise
loop. A 64-bit collision can only make a problem look contaminated (probability about corpus
n-grams x problem n-grams / 2^64, 1e-5 for 1e9 x 1e5): the guard errs towards dropping.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

__all__ = ["NGRAM", "NgramIndex", "words"]

NGRAM = 13
_WORD = re.compile(r"\w+")
_P = np.uint64(0x100000001B3)  # the polynomial's base (FNV's 64-bit prime)
_BATCH_DOCS = 1024


def words(text: str) -> list[str]:
    """The words the rule compares: runs of word characters of the NFC, lower-cased text.

    >>> words("Natalia sold $48$ clips; \\\\frac{a}{b}!")
    ['natalia', 'sold', '48', 'clips', 'frac', 'a', 'b']
    """
    return _WORD.findall(unicodedata.normalize("NFC", text).lower())


class _WordHashes:
    """64-bit hashes of words, each distinct word hashed once."""

    def __init__(self):
        self.cache: dict[str, int] = {}

    def __call__(self, ws: Sequence[str]) -> np.ndarray:
        cache = self.cache
        out = np.empty(len(ws), dtype=np.uint64)
        for i, w in enumerate(ws):
            h = cache.get(w)
            if h is None:
                h = cache[w] = int.from_bytes(hashlib.blake2b(w.encode("utf-8"), digest_size=8).digest(), "little")
            out[i] = h
        if len(cache) > 5_000_000:  # bounded memory on an endless vocabulary (numbers, ids)
            cache.clear()
        return out


def _windows(hashes: np.ndarray, n: int) -> np.ndarray:
    """The hash of every window of n consecutive words: sum_j hashes[i+j] * P^(n-1-j) mod 2^64."""
    m = len(hashes) - n + 1
    if m <= 0:
        return np.zeros(0, dtype=np.uint64)
    out = np.zeros(m, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(n):
            out = out * _P + hashes[j : j + m]
    return out


class NgramIndex:
    """The n-grams of a list of problems, and which of them a scanned corpus contains (`hits`)."""

    def __init__(self, texts: Sequence[str], n: int = NGRAM):
        self.n = n
        self.hash_words = _WordHashes()
        self.hits = np.zeros(len(texts), dtype=bool)
        by_length: dict[int, tuple[list[np.ndarray], list[np.ndarray]]] = {}
        for i, text in enumerate(texts):
            ws = words(text)
            if not ws:
                continue
            length = min(n, len(ws))  # a short problem is one gram: all its words
            grams = np.unique(_windows(self.hash_words(ws), length))
            hashes, owners = by_length.setdefault(length, ([], []))
            hashes.append(grams)
            owners.append(np.full(len(grams), i, dtype=np.int64))
        self.lengths: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for length, (hashes, owners) in by_length.items():
            h, o = np.concatenate(hashes), np.concatenate(owners)
            order = np.argsort(h, kind="stable")
            self.lengths[length] = (h[order], o[order])

    def scan(self, documents: Iterable[str]) -> int:
        """Mark the problems that overlap any of these documents; returns the documents read."""
        batch: list[str] = []
        count = 0
        for doc in documents:
            batch.append(doc)
            if len(batch) >= _BATCH_DOCS:
                self._scan_batch(batch)
                count += len(batch)
                batch = []
        if batch:
            self._scan_batch(batch)
            count += len(batch)
        return count

    def _scan_batch(self, documents: list[str]) -> None:
        if not self.lengths:
            return
        per_doc = [words(d) for d in documents]
        flat = [w for ws in per_doc for w in ws]
        if not flat:
            return
        hashes = self.hash_words(flat)
        doc_of = np.repeat(np.arange(len(per_doc)), [len(ws) for ws in per_doc])
        for length, (known, owners) in self.lengths.items():
            grams = _windows(hashes, length)
            if not len(grams):
                continue
            inside = doc_of[: len(grams)] == doc_of[length - 1 :]  # the window lies in one document
            found = np.unique(grams[inside & np.isin(grams, known)])
            for h in found:
                lo, hi = np.searchsorted(known, h, "left"), np.searchsorted(known, h, "right")
                self.hits[owners[lo:hi]] = True

    def scan_prepared(self, prepared_dir: str | Path, progress: bool = False) -> int:
        """Scan every document of a finished `rpt prepare` directory (shard by shard, its `text`
        column in record batches); returns the documents read."""
        import pyarrow.parquet as pq
        from tqdm import tqdm

        from rptdata.io import STAGE_PREPARE, checked_shards, parquet_errors, read_manifest

        manifest = read_manifest(Path(prepared_dir), STAGE_PREPARE)
        count = 0
        for shard in tqdm(
            checked_shards(prepared_dir, "docs", manifest),
            desc=f"overlap {Path(prepared_dir).name}",
            unit=" shard",
            disable=not progress,
            dynamic_ncols=True,
        ):
            with parquet_errors(shard):
                for batch in pq.ParquetFile(shard).iter_batches(batch_size=_BATCH_DOCS, columns=["text"]):
                    count += self.scan(batch.column(0).to_pylist())
        return count
