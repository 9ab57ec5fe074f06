"""`rpt make-tasks` (rptdata/tasks/build.py, taskdef.py, bands.py): helpers (with property tests),
accounting, split, resume, rerun refusal, caps, readers (rpttrain/data.py), CLI.

The scored input is synthetic: the real `run_prepare` on a small mixed-script corpus (smollm2-135m
tokenizer), then positions shards with made-up entropies written through StageDir, so these tests
do not depend on the scorer.

Run: .venv/bin/python -m pytest -q tests/test_tasks.py
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cli.main import cli
from rptdata.bands import band_of, parse_bands
from rptdata.errors import ManifestMismatch, MissingUpstream
from rptdata.io import list_shards, read_manifest, shard_index
from rptdata.prepare import PrepareConfig, run_prepare
from rptdata.spans import ByteSpanTokenizer
from rptdata.stage import StageDir
from rptdata.tasks import SKIP_REASONS, MakeTasksConfig, run_make_tasks
from rptdata.tasks import build as tasks_mod
from rptdata.tasks.taskdef import TASKS_SCHEMA, continuation_at, cut_context, split_of
from rpttrain.data import iter_tasks, load_tasks
from rpttrain.reward import first_token_reward, prefix_reward

# ---------------------------------------------------------------------------------------------
# synthetic scored directories (also used by tests/test_export.py)

PIECES = [
    "Let $x = \\frac{a}{b}$ and solve for $x$.",
    "東京は日本の首都です。世界で最も大きな都市の一つ。",
    "Party time 🎉🎉 and a rocket 🚀, done 😀.",
    "naïve café — résumé, Ångström, ñ, ü.",
    "𝔽 is a field; ∑ᵢ xᵢ² ≥ 0 holds for all real xᵢ.",
    "The quick brown fox jumps over the lazy dog 12345 times.",
    "한국어 텍스트와 English mixed 文字 together.",
    "Combining marks: e\u0301 a\u0300 o\u0308 and emoji 👩‍👩‍👧 family.",
]


def corpus_texts(n_docs: int = 24) -> list[str]:
    return [" ".join(PIECES[(i + j) % len(PIECES)] for j in range(1 + i % 3)) + f" (doc {i})" for i in range(n_docs)]


def fake_entropy(doc_id: str, pos: int) -> float:
    """Deterministic made-up entropy in [0, 3) (no dependence on the tmp path's randomness)."""
    return hashlib.sha256(f"{doc_id.rsplit('#', 1)[-1]}@{pos}".encode()).digest()[0] / 256 * 3


def build_scored(root, texts=None, shard_docs: int = 6, tokenizer: str = "smollm2-135m", nan_every: int = 0):
    """PREP (real run_prepare) + SCORED (positions 0..n-1 of every document, fake entropies).

    Returns (scored_dir, prepared_dir). `nan_every` > 0 makes every such position's entropy NaN.
    """
    root.mkdir(parents=True, exist_ok=True)
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in (texts or corpus_texts())))
    prep = root / "prep"
    run_prepare(
        PrepareConfig(inputs=(str(corpus),), out=str(prep), tokenizer=tokenizer, shard_docs=shard_docs, progress=False)
    )
    pm = read_manifest(prep, "prepare")
    scored = root / "scored"
    stage = StageDir(scored, "score-entropy", ["positions"])
    stage.begin({"prepared": pm["fingerprint"], "proxy": "fake"})
    for shard in list_shards(prep / "docs"):
        index = shard_index(shard)
        cols = {k: [] for k in ("doc_id", "pos", "token_id", "entropy", "target_logprob", "target_rank", "top1_id")}
        for doc in pq.read_table(shard).to_pylist():
            for pos, tok in enumerate(doc["token_ids"]):
                h = fake_entropy(doc["doc_id"], pos)
                cols["doc_id"].append(doc["doc_id"])
                cols["pos"].append(pos)
                cols["token_id"].append(tok)
                cols["entropy"].append(math.nan if nan_every and pos % nan_every == 3 else h)
                cols["target_logprob"].append(-h)
                cols["target_rank"].append(pos % 5)
                cols["top1_id"].append(tok if pos % 5 == 0 else 0)
        schema = pa.schema(
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
        stage.write_shard(
            "positions", index, pa.Table.from_pydict(cols, schema=schema), {"positions": len(cols["pos"])}
        )
    stage.finish(
        {
            "tokenizer": pm["tokenizer"],
            "proxy": {"name": "fake-proxy", "spec": "fake", "vocab_hash": pm["tokenizer"]["vocab_hash"]},
            "prepared": {"dir": str(prep.resolve()), "fingerprint": pm["fingerprint"]},
        }
    )
    return scored, prep


def read_docs(prep) -> dict[str, dict]:
    return {d["doc_id"]: d for s in list_shards(prep / "docs") for d in pq.read_table(s).to_pylist()}


def read_split(out, split) -> list[dict]:
    return [r for s in list_shards(out / split) for r in pq.read_table(s).to_pylist()]


def read_positions(scored) -> list[dict]:
    return [r for s in list_shards(scored / "positions") for r in pq.read_table(s).to_pylist()]


def pick_seed(doc_ids, fraction, minimum=3) -> int:
    """A seed that puts at least `minimum` documents in each split (doc ids hold the tmp path)."""
    for seed in range(100):
        n_eval = sum(split_of(d, seed, fraction) == "eval" for d in doc_ids)
        if minimum <= n_eval <= len(doc_ids) - minimum:
            return seed
    raise AssertionError("no seed splits these documents")


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """(scored_dir, prepared_dir, docs by id, seed with both splits populated at eval_fraction 0.3)."""
    scored_dir, prep = build_scored(tmp_path_factory.mktemp("tasks_src"), nan_every=37)
    docs = read_docs(prep)
    return scored_dir, prep, docs, pick_seed(list(docs), 0.3)


def cfg(scored, out, **kw):
    base = dict(
        scored_dir=str(scored[0]),
        out=str(out),
        threshold=0.0,
        eval_fraction=0.3,
        seed=scored[3],
        context_tokens=16,
        continuation_tokens=4,
        progress=False,
    )
    return MakeTasksConfig(**{**base, **kw})


def tables(out) -> dict:
    return {s: [pq.read_table(p) for p in list_shards(out / s)] for s in ("train", "eval")}


# ---------------------------------------------------------------------------------------------
# pure helpers


def test_band_of_and_parse_bands():
    assert [band_of(h) for h in (0.0, 0.5, 0.51, 1.0, 1.2, 1.5, 1.51, 9)] == [
        "other",
        "other",
        "easy",
        "easy",
        "medium",
        "medium",
        "hard",
        "hard",
    ]
    assert band_of(float("nan")) == "other"
    assert parse_bands("a=1,b=2") == (("a", 1.0), ("b", 2.0))
    with pytest.raises(ValueError, match="name every band"):
        parse_bands("a=1,2")
    with pytest.raises(ValueError, match="numbers"):
        parse_bands("x,y,z")


def test_split_of_is_stable_and_seeded():
    ids = [f"doc-{i}" for i in range(2000)]
    split = [split_of(d, 7, 0.2) for d in ids]
    assert split == [split_of(d, 7, 0.2) for d in ids]
    assert 0.15 < split.count("eval") / len(ids) < 0.25
    assert split != [split_of(d, 8, 0.2) for d in ids]
    assert all(split_of(d, 7, 0.0) == "train" and split_of(d, 7, 1.0) == "eval" for d in ids[:50])
    # the documented rule, recomputed by hand
    u = (int.from_bytes(hashlib.sha256(b"7:doc-3").digest()[:8], "big") >> 11) / 2**53
    assert split_of("doc-3", 7, 0.2) == ("eval" if u < 0.2 else "train")


def test_config_validation_explains():
    with pytest.raises(ValueError, match="between 0 and 1"):
        MakeTasksConfig("s", "o", eval_fraction=1.5)
    with pytest.raises(ValueError, match="strictly increasing"):
        MakeTasksConfig("s", "o", bands=(("a", 1.0), ("b", 0.5)))
    with pytest.raises(ValueError, match="at least 1"):
        MakeTasksConfig("s", "o", context_tokens=0)
    with pytest.raises(ValueError, match="at least 1"):
        MakeTasksConfig("s", "o", continuation_tokens=0)
    with pytest.raises(ValueError, match="--max-tasks"):
        MakeTasksConfig("s", "o", max_tasks=-1)
    with pytest.raises(ValueError, match="not 'other'"):
        MakeTasksConfig("s", "o", bands="other=1")
    assert MakeTasksConfig("s", "o", bands="0.2,0.4,0.8").bands == (("easy", 0.2), ("medium", 0.4), ("hard", 0.8))


def test_cut_context_refuses_mid_character():
    text = "a世".encode()
    with pytest.raises(ValueError, match="inside a multi-byte character"):
        cut_context(text, [1, 2, 4], 2, 4)  # token 1 holds only the first byte of 世


_CHARS = list("ab xyz019 .,$\\{}\n") + list("世界中文한é") + ["\u0301", "🎉", "😀", "𝔽", "👩\u200d👧"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    pieces=st.lists(st.sampled_from(_CHARS), min_size=1, max_size=40),
    n_ctx=st.integers(1, 8),
    k=st.integers(1, 5),
)
def test_context_and_continuation_properties(smollm2_tokenizer, pieces, n_ctx, k):
    spans = _spans(smollm2_tokenizer)
    text = spans.normalize("".join(pieces))
    batch = spans.encode_batch([text])
    assert not batch.bad
    raw, ends = text.encode("utf-8"), batch.ends.tolist()
    assert ends[-1] == len(raw)
    token_starts = {0, *ends}
    for pos in range(len(ends)):
        stop = ends[pos - 1] if pos else 0
        if stop < len(raw) and raw[stop] & 0xC0 == 0x80:  # context would end inside a character
            with pytest.raises(ValueError):
                cut_context(raw, ends, pos, n_ctx)
            continue
        context, used = cut_context(raw, ends, pos, n_ctx)
        cont, bounds = continuation_at(raw, ends, pos, k)
        c, x = context.encode(), cont.encode()
        # contiguous in the document: context ends where the continuation starts, at the position
        assert raw[stop - len(c) : stop] == c and raw[stop : stop + len(x)] == x
        assert stop - len(c) in token_starts and 0 <= used <= min(n_ctx, pos)
        assert used == 0 or (ends[pos - used - 1] if pos - used else 0) == stop - len(c)
        if used < min(n_ctx, pos):  # shortened only because the window started inside a character
            first = ends[pos - n_ctx - 1] if pos - n_ctx > 0 else 0
            assert raw[first] & 0xC0 == 0x80
        # boundaries: strictly increasing token ends, the last one is the whole continuation
        assert bounds and all(b > a for a, b in zip([0] + bounds, bounds)) and bounds[-1] == len(x)
        assert all(stop + b in token_starts for b in bounds)
        token = raw[stop : ends[pos]]
        try:
            whole = token.decode("utf-8")
        except UnicodeDecodeError:
            whole = None
        if whole is not None:  # the true next token wins whenever it is whole characters
            assert prefix_reward(whole, cont, bounds) == 1.0
            assert first_token_reward(whole, cont, bounds) == 1.0
            assert prefix_reward(cont, cont, bounds) == 1.0


_SPANS = {}


def _spans(tokenizer) -> ByteSpanTokenizer:
    if id(tokenizer) not in _SPANS:
        _SPANS[id(tokenizer)] = ByteSpanTokenizer(tokenizer, name="smollm2-135m")
    return _SPANS[id(tokenizer)]


# ---------------------------------------------------------------------------------------------
# the stage


def test_counts_reconcile_schema_and_splits(scored, tmp_path):
    out = tmp_path / "t"
    m = run_make_tasks(cfg(scored, out, threshold=0.6))
    c = m["counts"]
    positions = read_positions(scored[0])
    assert c["positions_in"] == len(positions)
    assert c["positions_in"] == c["tasks"]["train"] + c["tasks"]["eval"] + sum(c["skipped"].values())
    assert set(c["skipped"]) == set(SKIP_REASONS)
    assert c["skipped"]["nan_entropy"] > 0 and c["skipped"]["below_threshold"] > 0 and c["skipped"]["mid_character"] > 0
    assert c["skipped"]["empty_context"] > 0  # position 0 of every document
    train, evals = read_split(out, "train"), read_split(out, "eval")
    assert len(train) == c["tasks"]["train"] > 0 and len(evals) == c["tasks"]["eval"] > 0
    for split, rows in (("train", train), ("eval", evals)):
        assert sum(c["tasks_by_band"][split].values()) == len(rows)
        for band, n in c["tasks_by_band"][split].items():
            assert n == sum(r["band"] == band for r in rows)
    # no document in both splits, and each document is where split_of puts it
    train_docs, eval_docs = {r["doc_id"] for r in train}, {r["doc_id"] for r in evals}
    assert not train_docs & eval_docs
    assert all(split_of(d, scored[3], 0.3) == "train" for d in train_docs)
    assert all(split_of(d, scored[3], 0.3) == "eval" for d in eval_docs)
    assert c["documents"]["train"] + c["documents"]["eval"] == len(scored[2])
    assert c["documents_with_tasks"] == {"train": len(train_docs), "eval": len(eval_docs)}
    # manifest: upstream copied, split rule recorded, schema
    assert m["stage"] == "make-tasks" and m["proxy"]["name"] == "fake-proxy"
    assert m["tokenizer"] == read_manifest(scored[1], "prepare")["tokenizer"]
    assert m["split"]["seed"] == scored[3] and m["split"]["eval_fraction"] == 0.3 and m["split"]["hash"] == "sha256"
    assert m["bands"] == {"easy": 0.5, "medium": 1.0, "hard": 1.5}
    assert str(pq.read_schema(list_shards(out / "train")[0]).field("boundaries").type) == "list<element: int32>"
    # every task against its document
    docs = scored[2]
    for r in train + evals:
        doc = docs[r["doc_id"]]
        raw, ends, pos = doc["text"].encode(), doc["token_end_bytes"], r["pos"]
        stop = ends[pos - 1]
        assert r["task_id"] == f"{r['doc_id']}@{pos}" and r["target_id"] == doc["token_ids"][pos]
        assert raw[:stop].endswith(r["context"].encode()) and raw[stop:].startswith(r["continuation"].encode())
        assert 0 < r["context_tokens"] <= 16 and len(r["boundaries"]) >= 1
        assert r["boundaries"][-1] == len(r["continuation"].encode())
        assert r["entropy"] >= 0.6 and r["band"] == band_of(r["entropy"])
        assert r["target_logprob"] == pytest.approx(-r["entropy"]) and r["target_rank"] == pos % 5
    assert len({r["task_id"] for r in train + evals}) == len(train) + len(evals)


def test_mid_character_and_empty_context_counted_exactly(scored, tmp_path):
    m = run_make_tasks(cfg(scored, tmp_path / "t", context_tokens=1))
    docs, expected_mid, expected_empty = scored[2], 0, 0
    for p in read_positions(scored[0]):
        if math.isnan(p["entropy"]):
            continue
        doc = docs[p["doc_id"]]
        raw, ends, pos = doc["text"].encode(), doc["token_end_bytes"], p["pos"]
        stop = ends[pos - 1] if pos else 0
        if stop < len(raw) and raw[stop] & 0xC0 == 0x80:
            expected_mid += 1
        elif pos == 0 or (pos >= 2 and raw[ends[pos - 2]] & 0xC0 == 0x80):
            expected_empty += 1  # one context token that is the tail of a split character
    assert expected_mid > 0 and expected_empty > len(docs)
    assert m["counts"]["skipped"]["mid_character"] == expected_mid
    assert m["counts"]["skipped"]["empty_context"] == expected_empty


def test_caps_are_exact_deterministic_and_sampled_by_hash(scored, tmp_path):
    full = run_make_tasks(cfg(scored, tmp_path / "full"))
    rows = {s: {r["task_id"]: r for r in read_split(tmp_path / "full", s)} for s in ("train", "eval")}
    m1 = run_make_tasks(cfg(scored, tmp_path / "a", max_tasks=7, max_eval_tasks=3))
    run_make_tasks(cfg(scored, tmp_path / "b", max_tasks=7, max_eval_tasks=3))
    assert m1["counts"]["tasks"] == {"train": 7, "eval": 3}
    assert m1["counts"]["skipped"]["over_max_tasks"] == full["counts"]["tasks"]["train"] - 7
    assert m1["counts"]["skipped"]["over_max_eval_tasks"] == full["counts"]["tasks"]["eval"] - 3
    assert tables(tmp_path / "a") == tables(tmp_path / "b")
    seed = scored[3]
    for split, n in (("train", 7), ("eval", 3)):
        got = read_split(tmp_path / "a", split)
        by_hash = sorted(rows[split], key=lambda t: hashlib.sha256(f"{seed}:task:{t}".encode()).digest()[:16])
        assert sorted(r["task_id"] for r in got) == sorted(by_hash[:n])
        assert all(r == rows[split][r["task_id"]] for r in got)  # same task, same row
    big = run_make_tasks(cfg(scored, tmp_path / "c", max_tasks=10**9, max_eval_tasks=0))
    assert big["counts"]["tasks"] == {"train": full["counts"]["tasks"]["train"], "eval": 0}
    assert big["counts"]["skipped"]["over_max_tasks"] == 0
    assert big["counts"]["skipped"]["over_max_eval_tasks"] == full["counts"]["tasks"]["eval"]


def test_resume_after_crash_matches_uninterrupted_run(scored, tmp_path, monkeypatch):
    config = cfg(scored, tmp_path / "crash", max_tasks=25)
    real = tasks_mod._write_task_shard
    calls = []

    def crash_after_first(*args, **kwargs):
        if calls:
            raise RuntimeError("simulated crash")
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(tasks_mod, "_write_task_shard", crash_after_first)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_make_tasks(config)
    assert not (tmp_path / "crash" / "manifest.json").exists()
    with pytest.raises(MissingUpstream, match="still running"):
        load_tasks(tmp_path / "crash", "train")

    resumed_calls = []

    def counting(*args, **kwargs):
        resumed_calls.append(args[1].index)
        return real(*args, **kwargs)

    monkeypatch.setattr(tasks_mod, "_write_task_shard", counting)
    resumed = run_make_tasks(config)
    assert 0 not in resumed_calls and len(resumed_calls) == len(list_shards(scored[0] / "positions")) - 1
    monkeypatch.setattr(tasks_mod, "_write_task_shard", real)
    clean = run_make_tasks(cfg(scored, tmp_path / "clean", max_tasks=25))
    assert resumed["counts"] == clean["counts"] and resumed["fingerprint"] == clean["fingerprint"]
    assert tables(tmp_path / "crash") == tables(tmp_path / "clean")


def test_rerun_refused_with_other_options_overwrite_replaces(scored, tmp_path):
    out = tmp_path / "t"
    first = run_make_tasks(cfg(scored, out))
    again = run_make_tasks(cfg(scored, out))  # same options: already done, nothing rewritten
    assert again["fingerprint"] == first["fingerprint"] and again["finished"] == first["finished"]
    with pytest.raises(ManifestMismatch, match="threshold"):
        run_make_tasks(cfg(scored, out, threshold=1.0))
    second = run_make_tasks(cfg(scored, out, threshold=1.0, overwrite=True))
    assert second["counts"]["tasks"]["train"] < first["counts"]["tasks"]["train"]
    assert all(r["entropy"] >= 1.0 for r in read_split(out, "train"))


def test_refuses_non_scored_or_unfinished_or_mismatched_input(scored, tmp_path):
    with pytest.raises(MissingUpstream, match="score-entropy"):
        run_make_tasks(cfg(scored, tmp_path / "a", scored_dir=str(scored[1])))
    partial = tmp_path / "partial"
    shutil.copytree(scored[0], partial)
    (partial / "manifest.json").unlink()
    with pytest.raises(MissingUpstream, match="no manifest.json"):
        run_make_tasks(cfg(scored, tmp_path / "b", scored_dir=str(partial)))
    # a scored dir whose manifest points at a prepared dir that is gone: --prepared fixes it
    moved = tmp_path / "moved"
    shutil.copytree(scored[0], moved)
    manifest = json.loads((moved / "manifest.json").read_text())
    manifest["prepared"]["dir"] = str(tmp_path / "gone")
    (moved / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(MissingUpstream, match="--prepared"):
        run_make_tasks(cfg(scored, tmp_path / "c", scored_dir=str(moved)))
    assert run_make_tasks(cfg(scored, tmp_path / "c", scored_dir=str(moved), prepared_dir=str(scored[1])))["counts"][
        "tasks"
    ]
    manifest["prepared"]["dir"] = str(scored[1])
    manifest["tokenizer"] = {**manifest["tokenizer"], "vocab_hash": "0000"}
    (moved / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestMismatch, match="vocab"):
        run_make_tasks(cfg(scored, tmp_path / "d", scored_dir=str(moved)))
    manifest["tokenizer"] = read_manifest(scored[0], "score-entropy")["tokenizer"]
    manifest["prepared"]["fingerprint"] = "0000"  # the prepared dir was re-run since scoring
    (moved / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestMismatch, match="fingerprint"):
        run_make_tasks(cfg(scored, tmp_path / "e", scored_dir=str(moved)))


def test_readers(scored, tmp_path):
    out = tmp_path / "t"
    m = run_make_tasks(cfg(scored, out))
    train = list(iter_tasks(out, "train"))
    assert len(train) == m["counts"]["tasks"]["train"] and set(train[0]) == set(TASKS_SCHEMA.names)
    assert load_tasks(out, "eval") == list(iter_tasks(out, "eval"))
    assert load_tasks(out, "train", limit=5) == train[:5] and load_tasks(out, "train", limit=0) == []
    assert list(iter_tasks(out, "eval", columns=["task_id"]))[0].keys() == {"task_id"}
    with pytest.raises(ValueError, match="split"):
        load_tasks(out, "test")
    import duckdb

    n = duckdb.sql(f"select count(*) from read_parquet('{out}/train/part-*.parquet')").fetchall()[0][0]
    assert n == m["counts"]["tasks"]["train"]


def test_cli(scored, tmp_path):
    out = tmp_path / "t"
    args = [
        "make-tasks",
        str(scored[0]),
        "--out",
        str(out),
        "--threshold",
        "0",
        "--seed",
        str(scored[3]),
        "--eval-fraction",
        "0.3",
        "--context-tokens",
        "32",
        "--bands",
        "lo=0.5,hi=2",
        "--max-eval-tasks",
        "4",
        "--no-progress",
    ]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    assert "make-tasks:" in r.output and "lo " in r.output
    m = read_manifest(out, "make-tasks")
    assert m["bands"] == {"lo": 0.5, "hi": 2.0} and m["counts"]["tasks"]["eval"] == 4
    assert {r["band"] for r in read_split(out, "train")} <= {"lo", "hi", "other"}
    r = CliRunner().invoke(cli, [*args[:-1], "--threshold", "1", "--no-progress"])
    assert r.exit_code == 1 and "--overwrite" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(cli, ["make-tasks", str(scored[1]), "--out", str(tmp_path / "x"), "--no-progress"])
    assert r.exit_code == 1 and "score-entropy" in r.output
    r = CliRunner().invoke(cli, ["make-tasks", str(scored[0]), "--out", str(tmp_path / "y"), "--eval-fraction", "2"])
    assert r.exit_code == 2 and "between 0 and 1" in r.output
