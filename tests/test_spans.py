"""The byte-span invariant, on every tokenizer rpt supports (property tests + real corpora).

For each document: the token byte spans tile the UTF-8 bytes exactly, and each span's bytes are
what that token decodes to (checked with the tokenizer's own decode, independently of rpt's table).
"""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rptdata.errors import TokenizerNotSupported
from rptdata.spans import ByteSpanTokenizer, token_spans
from tests.conftest import OMNIMATH

PIECES = [
    "🎉",
    "👩‍👩‍👧",
    "世界",
    "中文字符",
    "e\u0301",
    "a\u0308\u0323",
    "\r\n",
    "\n\n",
    "    ",
    "\t",
    "0123456789",
    "1e-10",
    "ﬁ",
    "Å",
    "Å",
    "한국어",
    "\u200b",
    "x²",
    "𝔘𝔫𝔦",
    "ا لعربية",
    " para",
    "graph",
    "$\\frac{a}{b}$",
]
texts = st.lists(
    st.one_of(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=30), st.sampled_from(PIECES)),
    max_size=12,
).map("".join)


def check_doc(tokenizer, spans, text):
    text = spans.normalize(text)
    batch = spans.encode_batch([text])
    ids, ends = batch.ids.tolist(), batch.ends.tolist()
    raw = text.encode("utf-8")
    if batch.bad:  # only allowed when the vocabulary has no token for one of the bytes
        assert set(raw) & spans.missing_bytes, f"exact spans refused for {text!r}"
        assert "no token" in spans.explain(text)
        return 0
    assert (ends[-1] if ends else 0) == len(raw)
    pieces = [raw[s:e] for s, e in token_spans(ends)]
    assert all(pieces), "every token covers at least one byte"
    assert b"".join(pieces) == raw
    assert tokenizer.decode(ids) == text  # the tokenizer's own round trip
    for tid, piece in zip(ids, pieces):
        alone = tokenizer.decode([tid])
        if "\ufffd" not in alone:  # a whole-character token: compare with its own decode
            assert alone.encode("utf-8") == piece
        assert spans.token_bytes[tid] == piece
    return len(ids)


@pytest.fixture(scope="module")
def all_tokenizers(smollm2_tokenizer, tiny_bpe_dir, request):
    from rptdata.models import load_tokenizer

    toks = {"smollm2": smollm2_tokenizer, "tiny-bpe": load_tokenizer(str(tiny_bpe_dir))}
    try:
        toks["r1-distill-qwen"] = request.getfixturevalue("qwen_tokenizer")
    except pytest.skip.Exception:
        pass
    return {name: (tok, ByteSpanTokenizer(tok, name)) for name, tok in toks.items()}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=texts)
def test_byte_spans_tile_arbitrary_unicode(all_tokenizers, text):
    for tokenizer, spans in all_tokenizers.values():
        check_doc(tokenizer, spans, text)


def test_batches_of_mixed_documents_match_single(all_tokenizers):
    docs = ["", "a", "世界 🎉", "\x16", "\r\n\r\n", "x" * 1000, "e\u0301" * 50]
    for _, spans in all_tokenizers.values():
        together = spans.encode_batch(docs)
        for j, doc in enumerate(docs):
            alone = spans.encode_batch([doc])
            lo, hi = together.offsets[j], together.offsets[j + 1]
            assert together.ids[lo:hi].tolist() == alone.ids.tolist()
            assert together.ends[lo:hi].tolist() == alone.ends.tolist()
            assert (j in together.bad) == bool(alone.bad)


def test_multibyte_character_split_across_tokens(smollm2_tokenizer):
    spans = ByteSpanTokenizer(smollm2_tokenizer, "smollm2")
    text = "龘"  # rare CJK: byte-level BPE splits its 3 bytes over several tokens
    batch = spans.encode_batch([text])
    assert len(batch.ids) >= 2
    assert batch.ends.tolist()[-1] == 3
    assert all(0 < e <= 3 for e in batch.ends.tolist())


def test_nfc_tokenizer_spans_are_exact_against_normalized_text(qwen_tokenizer):
    spans = ByteSpanTokenizer(qwen_tokenizer, "qwen")
    decomposed = "e\u0301cole"  # NFC composes it to "école"
    assert spans.normalize(decomposed) == "\u00e9cole"
    check_doc(qwen_tokenizer, spans, decomposed)
    batch = spans.encode_batch(["ok", decomposed, "fine"])  # un-normalized text cannot get exact spans
    assert batch.bad == [1]
    assert "rewrites" in spans.explain(decomposed)


def test_non_byte_level_tokenizer_is_refused(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(TokenizerNotSupported, match="not a byte-level"):
        ByteSpanTokenizer(PreTrainedTokenizerFast(tokenizer_object=tok), "wordlevel")


@pytest.mark.slow
@pytest.mark.skipif(not OMNIMATH.exists(), reason="../shared/corpora is not present")
def test_byte_spans_on_real_corpus(all_tokenizers):
    docs = [json.loads(line) for line in OMNIMATH.open()][:300]
    texts = [d["problem"] + "\n\n" + d["solution"] for d in docs]
    for tokenizer, spans in all_tokenizers.values():
        n = sum(check_doc(tokenizer, spans, t) for t in texts[:60])
        assert n > 10_000
        batch = spans.encode_batch([spans.normalize(t) for t in texts])
        assert batch.bad == []
        assert batch.offsets[-1] > 50_000


@pytest.fixture(scope="module")
def plain_and_auto(smollm2_tokenizer, request):
    """(tokenizer.json loaded by `tokenizers` alone, the AutoTokenizer) pairs: what prepare loads, what the other stages load."""
    from rptdata.models import load_plain_tokenizer

    pairs = {"smollm2": ("smollm2-135m", smollm2_tokenizer)}
    try:
        pairs["r1-distill-qwen"] = (
            str(request.getfixturevalue("qwen_tokenizer").name_or_path),
            request.getfixturevalue("qwen_tokenizer"),
        )
    except pytest.skip.Exception:
        pass
    out = {}
    for name, (spec, auto) in pairs.items():
        plain = load_plain_tokenizer(spec)
        assert type(plain).__module__.startswith("tokenizers"), f"{name}: prepare should not need transformers"
        out[name] = (ByteSpanTokenizer(plain, name), ByteSpanTokenizer(auto, name))
    return out


def _same_encoding(plain, auto, docs):
    from rptdata.models import vocab_hash

    assert vocab_hash(plain.backend) == vocab_hash(auto.backend)
    assert [plain.normalize(d) for d in docs] == [auto.normalize(d) for d in docs]
    a, b = plain.encode_batch([plain.normalize(d) for d in docs]), auto.encode_batch([auto.normalize(d) for d in docs])
    assert a.ids.tolist() == b.ids.tolist() and a.ends.tolist() == b.ends.tolist()
    assert a.offsets.tolist() == b.offsets.tolist() and a.bad == b.bad


def test_plain_tokenizer_equals_autotokenizer_on_hostile_unicode_and_nfc(plain_and_auto):
    docs = PIECES + [
        "".join(PIECES),
        "e\u0301cole",
        "Cafe\u0301 \u212b \u2126",
        "\x00\x16",
        " leading",
        "trailing  ",
        "",
    ]
    for plain, auto in plain_and_auto.values():
        _same_encoding(plain, auto, docs)
    if "r1-distill-qwen" in plain_and_auto:  # the NFC normalizer came along
        assert plain_and_auto["r1-distill-qwen"][0].normalize("e\u0301cole") == "\u00e9cole"


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(docs=st.lists(texts, min_size=1, max_size=5))
def test_plain_tokenizer_equals_autotokenizer_property(plain_and_auto, docs):
    for plain, auto in plain_and_auto.values():
        _same_encoding(plain, auto, docs)
