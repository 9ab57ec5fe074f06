"""Tokenization with exact per-token UTF-8 byte spans.

For a byte-level BPE vocabulary every token id always stands for the same bytes, so a
document's byte spans are a cumulative sum over a per-id byte-length table: no Python loop over
tokens and no `offset_mapping` (which is in characters, and gives two byte-level pieces of one
multi-byte character the same span). Every batch is then verified, vectorized: the tokens'
bytes, laid end to end, must equal the document's UTF-8 bytes exactly. A tokenizer that is not
byte-level, or that rewrites text in a way the spans cannot follow, is refused with a clear error.

Tokenizers with a normalizer (the Qwen2 family applies NFC) see the normalized text, so
`normalize()` gives the text that must be stored next to the spans.

    token i spans bytes [end[i-1], end[i]) of text.encode("utf-8"), with end[-1] = 0
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from rptdata.errors import TokenizerNotSupported


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's bytes_to_unicode: printable stand-in character -> byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _is_byte_level(backend) -> bool:
    text = " ".join(repr(x) for x in (backend.pre_tokenizer, backend.decoder))
    return "ByteLevel" in text


@lru_cache(maxsize=1)
def _byte_translation() -> dict[int, int | None]:
    """str.translate table: stand-in character -> the character whose code is its byte; the other
    characters below 256 -> deleted (so a token holding one comes out shorter: not byte-level)."""
    table: dict[int, int | None] = {c: None for c in range(256)}
    table.update({ord(ch): b for ch, b in _byte_decoder().items()})
    return table


@dataclass
class TokenizedBatch:
    """ids and byte ends of a batch, flat (like Arrow list arrays): doc j is [offsets[j], offsets[j+1])."""

    ids: np.ndarray  # int32, all tokens of the batch end to end
    ends: np.ndarray  # int32, byte end of each token within its own document
    offsets: np.ndarray  # int64, len = n_docs + 1
    bad: list[int]  # documents whose spans could not be made exact (see encode_batch)


class ByteSpanTokenizer:
    """Wraps a Hugging Face fast tokenizer (or its `tokenizers.Tokenizer`); encodes batches with exact byte ends."""

    def __init__(self, tokenizer, name: str = "tokenizer"):
        from tokenizers import Tokenizer

        backend = tokenizer if isinstance(tokenizer, Tokenizer) else getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise TokenizerNotSupported(f"{name}: a fast (Rust-backed) tokenizer is required")
        if not _is_byte_level(backend):
            raise TokenizerNotSupported(
                f"{name}: not a byte-level BPE tokenizer ({backend.pre_tokenizer!r}); rpt needs token ids "
                "that always stand for the same bytes to record exact byte spans"
            )
        self.name = name
        self.backend = backend
        self.normalizer = backend.normalizer
        self._build_table(backend)

    def _build_table(self, backend) -> None:
        vocab = backend.get_vocab(with_added_tokens=True)
        added = {t.content for t in backend.get_added_tokens_decoder().values()}
        size = max(vocab.values()) + 1
        pieces: list[bytes] = [b""] * size
        table = _byte_translation()
        for token, idx in vocab.items():
            if token in added:
                pieces[idx] = token.encode("utf-8")  # added tokens match their literal text
                continue
            raw = token.translate(table)  # stand-ins -> chars 0..255; any other char is dropped or stays > 255
            try:
                pieces[idx] = raw.encode("latin-1")
            except UnicodeEncodeError:
                raw = ""
            if len(raw) != len(token):
                raise TokenizerNotSupported(
                    f"{self.name}: token {idx} ({token!r}) is not in byte-level form; cannot map ids to bytes"
                )
        self.token_bytes = pieces
        self.lengths = np.array([len(p) for p in pieces], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.lengths)[:-1]]).astype(np.int64)
        self.flat = np.frombuffer(b"".join(pieces), dtype=np.uint8)
        self.missing_bytes = set(range(256)) - {p[0] for p in pieces if len(p) == 1}

    def normalize(self, text: str) -> str:
        """The text the model actually sees (identity for tokenizers without a normalizer)."""
        return self.normalizer.normalize_str(text) if self.normalizer is not None else text

    def encode_batch(self, texts: list[str], verify: bool = True) -> TokenizedBatch:
        """Token ids and byte ends of already-normalized texts, verified byte for byte.

        Documents whose tokens do not reproduce their bytes (a byte the vocabulary lacks, or text
        the tokenizer rewrites) are listed in `TokenizedBatch.bad`; their spans must not be used.
        """
        encodings = self.backend.encode_batch_fast(texts, add_special_tokens=False)
        id_lists = [e.ids for e in encodings]  # each .ids call builds a new Python list: once
        counts = np.fromiter(map(len, id_lists), dtype=np.int64, count=len(id_lists))
        offsets = np.concatenate([[0], np.cumsum(counts)])
        ids = np.fromiter(itertools.chain.from_iterable(id_lists), dtype=np.int64, count=int(offsets[-1]))
        lens = self.lengths[ids]
        global_ends = np.cumsum(lens)
        # per-document ends: subtract the bytes of all earlier documents
        ends = global_ends - np.repeat(_doc_starts(global_ends, offsets), counts)
        bad = self._verify(texts, ids, lens, counts) if verify else []
        return TokenizedBatch(ids.astype(np.int32), ends.astype(np.int32), offsets, bad)

    def _verify(self, texts, ids, lens, counts) -> list[int]:
        """Indices of documents whose token bytes, end to end, differ from their UTF-8 bytes."""
        encoded = [t.encode("utf-8") for t in texts]
        want = np.fromiter((len(b) for b in encoded), dtype=np.int64, count=len(texts))
        cum = np.concatenate([[0], np.cumsum(lens)])
        offsets = np.concatenate([[0], np.cumsum(counts)])
        got = cum[offsets[1:]] - cum[offsets[:-1]]  # bytes of each document's tokens (0 for none)
        same_len = got == want
        bad = set(np.nonzero(~same_len)[0].tolist())
        tok_mask = np.repeat(same_len, counts)
        good_ids, good_lens = ids[tok_mask], lens[tok_mask]
        total = int(good_lens.sum())
        # gather every token's bytes end to end and compare with the documents' bytes
        piece_start = np.repeat(self.starts[good_ids] - (np.cumsum(good_lens) - good_lens), good_lens)
        joined = self.flat[piece_start + np.arange(total)]
        expected = np.frombuffer(b"".join(b for b, ok in zip(encoded, same_len) if ok), dtype=np.uint8)
        diff = np.nonzero(joined != expected)[0]
        if len(diff):
            good_docs = np.nonzero(same_len)[0]
            bad |= set(good_docs[np.searchsorted(np.cumsum(want[same_len]), diff, side="right")].tolist())
        return sorted(bad)

    def explain(self, text: str) -> str:
        """Why a document cannot get exact spans (for error messages)."""
        raw = text.encode("utf-8")
        missing = sorted({b for b in raw} & self.missing_bytes)
        if missing:
            return f"its bytes {', '.join(hex(b) for b in missing[:5])} have no token in this vocabulary"
        return "the tokenizer rewrites this text (prefix space, normalization or lossy pieces)"


def _doc_starts(global_ends: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Cumulative bytes before each document, given flat token ends and document offsets."""
    before = np.zeros(len(offsets) - 1, dtype=np.int64)
    nonfirst = offsets[:-1] > 0
    before[nonfirst] = global_ends[offsets[:-1][nonfirst] - 1]
    return before


def token_spans(ends: list[int] | np.ndarray) -> list[tuple[int, int]]:
    """[(start, end)] byte spans from byte ends: token i spans [end[i-1], end[i]) with end[-1] = 0.

    >>> token_spans([2, 5, 6])
    [(0, 2), (2, 5), (5, 6)]
    """
    out, prev = [], 0
    for e in ends:
        out.append((prev, int(e)))
        prev = int(e)
    return out
