"""One shard of `rpt prepare`: the Arrow table of its documents, from their encoded batches.

    table, stats = docs_table(docs, batches, spans, config)   # docs: [(doc_id, source, text)]

The columns are built from buffers (`pa.Array.from_buffers`), not with `pa.array`, which imports
pandas (about a second of a fresh process's time to its first shard) to check its argument.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from rptdata.errors import BadInput
from rptdata.spans import ByteSpanTokenizer

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


def docs_table(docs: list, batches: list, spans: ByteSpanTokenizer, config) -> tuple[pa.Table | None, dict]:
    """One shard's table and stats from its documents and their encoded batches (`batch_docs`
    each). Documents that cannot get exact spans are left out and returned as `untokenizable`
    (an error without --skip-bad)."""
    ids_parts, ends_parts, counts_parts, kept, untokenizable = [], [], [], [], []
    for start, batch in zip(range(0, len(docs), config.batch_docs), batches):
        chunk = docs[start : start + config.batch_docs]
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
    if not docs:
        return None, {"documents": 0, "tokens": 0, "untokenizable": untokenizable}
    n_tokens = np.concatenate(counts_parts).astype(np.int32)
    offsets = _int32(np.concatenate([[0], np.cumsum(n_tokens, dtype=np.int64)]))
    table = pa.Table.from_arrays(
        [
            _strings([d[0] for d in docs]),
            _strings([d[1] for d in docs]),
            _strings([d[2] for d in docs]),
            pa.ListArray.from_arrays(offsets, _int32(np.concatenate(ids_parts))),
            pa.ListArray.from_arrays(offsets, _int32(np.concatenate(ends_parts))),
            _int32(n_tokens),
        ],
        schema=DOCS_SCHEMA,
    )
    return table, {"documents": len(docs), "tokens": int(n_tokens.sum()), "untokenizable": untokenizable}


def _int32(values: np.ndarray) -> pa.Array:
    values = np.ascontiguousarray(values, dtype=np.int32)
    return pa.Array.from_buffers(pa.int32(), len(values), [None, pa.py_buffer(values)])


def _strings(texts: list[str]) -> pa.Array:
    """A string array (32-bit offsets, as DOCS_SCHEMA says) of the texts.

    >>> _strings(["a", "", "été"]).to_pylist()
    ['a', '', 'été']
    """
    encoded = [t.encode("utf-8") for t in texts]
    ends = np.cumsum(np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded)))
    if len(ends) and ends[-1] >= 2**31:
        raise ValueError(
            f"a shard's texts hold {int(ends[-1]):,} bytes, over Arrow's 2 GiB per string column; lower --shard-docs"
        )
    offsets = np.concatenate([[0], ends]).astype(np.int32)
    return pa.Array.from_buffers(
        pa.string(), len(texts), [None, pa.py_buffer(offsets), pa.py_buffer(b"".join(encoded))]
    )
