"""The input stream of `rpt prepare`: every input in order, as one numbered stream of records,
cut into units (shards) of `shard_docs` records.

    stream = RecordStream(sources, TextBuilder(template=...), "train", shard_docs=10_000, max_docs=None)
    for a, b in plan_units(stream.total, 10_000):
        records = stream.read(a, b)      # RawRecords a..b-1, read forward when the last range ended at a

`accept_record` decides what becomes of each record (kept, normalized, rejected or dropped, with the
reason counted in `RecordCounts`).

`RecordStream` indexes the inputs once (`sources.index_source`: a line scan of each `.jsonl`,
marking every unit's first record), so any unit can be read alone: by a worker taking every n-th
shard, or by a Ray task that got the pickled stream (the index, never an open reader).
"""

from __future__ import annotations

import hashlib
import itertools
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from rptdata.errors import BadInput
from rptdata.sources import RawRecord, TextBuilder, index_source, read_source


def plan_units(total_records: int, shard_docs: int) -> list[tuple[int, int]]:
    """Shard i holds the documents kept from records [i*shard_docs, (i+1)*shard_docs) of the
    input stream (all inputs in order), so its name never depends on which worker made it.

    >>> plan_units(5, 2)
    [(0, 2), (2, 4), (4, 5)]
    """
    return [(a, min(a + shard_docs, total_records)) for a in range(0, total_records, shard_docs)]


class RecordStream:
    """Records [a, b) of the input stream for one worker, reading forward from where the last
    range ended when it can (one pass per source for a worker whose shards follow each other),
    else starting the source at the record (`index_source` marks every shard's first record)."""

    def __init__(self, sources, builder: TextBuilder, split: str, shard_docs: int, max_docs: int | None):
        self.sources, self.builder, self.split = sources, builder, split
        self.indexes, self.starts, total = [], [], 0
        for src in sources:
            index = index_source(src, split, mark_every=shard_docs, offset=total)
            self.indexes.append(index)
            self.starts.append(total)
            total += index.records
        self.total = total if max_docs is None else min(total, max_docs)
        self._open: tuple[int, int, Iterator[RawRecord]] | None = None  # (source, next record, reader)

    def read(self, a: int, b: int) -> Iterator[RawRecord]:
        for i, (src, start) in enumerate(zip(self.sources, self.starts)):
            lo, hi = max(a, start) - start, min(b, start + self.indexes[i].records) - start
            if lo >= hi:
                continue
            if self._open is not None and self._open[:2] == (i, lo):
                reader = self._open[2]
            else:
                reader = read_source(src, self.builder, self.split, start=lo, mark=self.indexes[i].marks.get(lo))
            yield from itertools.islice(reader, hi - lo)
            self._open = (i, hi, reader)

    def where(self, a: int, b: int) -> str:
        """Which inputs hold records [a, b), for messages."""
        names = [
            src.path
            for src, start, index in zip(self.sources, self.starts, self.indexes)
            if start < b and start + index.records > a
        ]
        return f"records {a}-{b - 1} of the input stream, in {', '.join(names)}"

    def __getstate__(self):  # a Ray task gets the index, not an open reader
        return {**self.__dict__, "_open": None}


@dataclass
class RecordCounts:
    """What happened to a unit's records: read, written (kept), tokens, normalized, rejected and dropped by reason."""

    read: int = 0
    written: int = 0
    tokens: int = 0
    normalized: int = 0
    rejected: Counter = field(default_factory=Counter)
    dropped: Counter = field(default_factory=Counter)


def accept_record(rec: RawRecord, config, spans, counts: RecordCounts, seen: set, rejects) -> str | None:
    """The record's (normalized) text if it is kept; else count it, and log a reject (BadInput naming
    the file and line instead, unless --skip-bad). `config`: PrepareConfig (skip_bad, min_chars, dedupe)."""
    reason, detail, text = rec.reject, rec.detail, rec.text
    if reason is None:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            reason, detail = "invalid_unicode", f"lone surrogate at character {e.start}"
    if reason is not None:
        if not config.skip_bad:
            raise BadInput(
                f"{rec.where()}: {reason.replace('_', ' ')}: {detail} (pass --skip-bad to skip such records)"
            )
        counts.rejected[reason] += 1
        rejects.append({"doc_id": rec.doc_id, "reason": reason, "detail": detail})
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
        key = content_key(text)
        if key in seen:
            counts.dropped["duplicate"] += 1
            return None
        seen.add(key)
    return text


def content_key(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
