"""Tests of `rpt query` / `rpt stats` (rptdata/query.py) over a scored directory made with a
fake scorer (known entropies, no model), plus the stage logic that does not need a real model.

Run: .venv/bin/python -m pytest -q tests/test_query.py
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from rptdata.errors import BadInput, MissingUpstream
from rptdata.prepare import PrepareConfig, run_prepare
from rptdata.query import compute_stats, connect, export_query, plot_entropy_hist, query_rows
from rptdata.score import ScoreConfig, run_score_entropy
from rptdata.scorers import PositionScores

TEXTS = [
    "The quick brown fox jumps over the lazy dog, and then it runs into the forest to find its friends.",
    "Let x = 3. Then 2x + 1 = 7, and x squared is 9.",
    "One two three four five six seven eight nine ten eleven twelve.",
    "Hi",
    "A short line.",
]


class FakeScorer:
    """Known, deterministic statistics: entropy = (37 * target % 300) / 100, top-1 right at even j."""

    name = "fake"
    dtype = "float32"
    top_k = 16
    entropy = "full-softmax"
    max_positions = None
    batch_tokens = 1024

    def score(self, sequences, firsts, progress=None):
        for i, (seq, first) in enumerate(zip(sequences, firsts)):
            seq = np.asarray(seq, dtype=np.int64)
            j = np.arange(first, len(seq))
            target = seq[j]
            entropy = ((37 * target) % 300 / 100).astype(np.float32)
            right = j % 2 == 0
            top1 = np.where(right, target, target + 1).astype(np.int32)
            topk = np.tile(top1[:, None], (1, 16)).astype(np.int32)
            yield (
                i,
                PositionScores(
                    entropy=entropy,
                    target_logprob=-entropy,
                    target_rank=np.where(right, 1, 2).astype(np.int32),
                    top1_id=top1,
                    topk_ids=topk,
                    topk_logprobs=np.zeros((len(j), 16), np.float32),
                ),
            )
            if progress:
                progress(len(j))


@pytest.fixture(scope="module")
def prep(tmp_path_factory):
    root = tmp_path_factory.mktemp("q")
    corpus = root / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    run_prepare(PrepareConfig(inputs=(str(corpus),), out=str(root / "prep"), shard_docs=2, progress=False))
    return root / "prep"


def _score(prep, out, **kw):
    config = ScoreConfig(prepared=str(prep), out=str(out), max_context=16, progress=False, **kw)
    return run_score_entropy(config, scorer=FakeScorer())


@pytest.fixture(scope="module")
def scored(prep, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "scored"
    _score(prep, out, keep_all=True)
    return out


def _expected(prep) -> list[dict]:
    rows = []
    for doc in pq.read_table(prep / "docs").to_pylist():
        for pos in range(1, doc["n_tokens"]):
            rows.append(
                {"doc_id": doc["doc_id"], "pos": pos, "entropy": np.float32((37 * doc["token_ids"][pos]) % 300 / 100)}
            )
    return rows


def test_views_and_counts(prep, scored):
    con = connect(scored)
    m = json.loads((scored / "manifest.json").read_text())
    n = con.sql("SELECT count(*) FROM positions").fetchall()[0][0]
    assert n == m["counts"]["positions_kept"] == len(_expected(prep))
    assert con.sql("SELECT count(*) FROM docs").fetchall()[0][0] == len(TEXTS)
    bad = con.sql(
        "SELECT count(*) FROM positions p JOIN docs d USING (doc_id) WHERE p.token_id != d.token_ids[p.pos + 1]"
    )
    assert bad.fetchall()[0][0] == 0, "token_id is the document's token at pos (DuckDB lists are 1-based)"
    cols, rows = query_rows(scored, "SELECT doc_id, pos, entropy FROM positions ORDER BY doc_id, pos")
    assert cols == ["doc_id", "pos", "entropy"]
    exp = sorted(_expected(prep), key=lambda r: (r["doc_id"], r["pos"]))
    assert [(r[0], r[1]) for r in rows] == [(e["doc_id"], e["pos"]) for e in exp]
    assert np.allclose([r[2] for r in rows], [e["entropy"] for e in exp])


def test_export_formats(scored, tmp_path):
    sql = "SELECT doc_id, pos, entropy FROM positions WHERE entropy > 1.0 ORDER BY doc_id, pos"
    n = export_query(scored, sql, tmp_path / "a.parquet", "parquet")
    assert pq.read_table(tmp_path / "a.parquet").num_rows == n > 0
    assert export_query(scored, sql, tmp_path / "a.csv", "csv") == n
    lines = (tmp_path / "a.csv").read_text().splitlines()
    assert lines[0] == "doc_id,pos,entropy" and len(lines) == n + 1
    assert export_query(scored, sql + ";", tmp_path / "a.json", "json") == n
    assert len(json.loads((tmp_path / "a.json").read_text())) == n
    with pytest.raises(BadInput, match="query failed"):
        export_query(scored, "SELECT nope FROM positions", tmp_path / "b.csv", "csv")
    assert not list(tmp_path.glob("*.tmp-*"))


def test_stats_bands_match_numpy(prep, scored, tmp_path):
    s = compute_stats(scored, (0.5, 1.0, 1.5))
    e = np.array([r["entropy"] for r in _expected(prep)])
    assert s["positions_scored"] == s["positions_kept"] == len(e)
    for band, b in zip(s["nested"], (0.5, 1.0, 1.5)):
        assert band["positions"] == int((e > b).sum()) and band["complete"]
        assert band["share"] == pytest.approx((e > b).mean())
    edges = [0, 0.5, 1.0, 1.5, np.inf]
    for band, lo, hi in zip(s["disjoint"], edges, edges[1:]):
        inside = (e > lo) & (e <= hi) if lo > 0 else (e <= hi)
        assert band["positions"] == int(inside.sum())
    assert sum(b["positions"] for b in s["disjoint"]) == len(e)
    assert s["quantiles"]["0.5"] == pytest.approx(float(np.quantile(e, 0.5)), abs=1e-6)
    assert sum(s["histogram"]["counts"]) == len(e)
    # accuracy: the fake scorer is right at even positions of each window (j relative to the window)
    assert 0 < s["accuracy"] < 1
    png = plot_entropy_hist(s, tmp_path / "h.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_stats_with_threshold_marks_incomplete_bands(prep, tmp_path):
    out = tmp_path / "scored"
    m = _score(prep, out, threshold=1.0)
    e = np.array([r["entropy"] for r in _expected(prep)])
    assert m["counts"]["positions_kept"] == int((e >= 1.0).sum())
    assert m["counts"]["positions_below_threshold"] == int((e < 1.0).sum())
    s = compute_stats(out, (0.5, 1.0, 1.5))
    assert [b["complete"] for b in s["nested"]] == [False, True, True]
    assert s["nested"][0]["share"] is None
    assert s["nested"][2]["share"] == pytest.approx((e > 1.5).mean())
    assert [b["complete"] for b in s["disjoint"]] == [False, False, True, True]


def test_stats_takes_the_bands_make_tasks_and_eval_take(prep, scored, tmp_path):
    """One reader of bands: thresholds, named bands, and the same refusals everywhere."""
    from click.testing import CliRunner

    from cli.main import cli

    named = compute_stats(scored, "easy=0.5,hard=1.5")
    e = np.array([r["entropy"] for r in _expected(prep)])
    assert [b["name"] for b in named["nested"]] == ["easy", "hard"]
    assert [b["positions"] for b in named["nested"]] == [int((e > 0.5).sum()), int((e > 1.5).sum())]
    assert compute_stats(scored, "0.5,1.0,1.5")["band_names"] == ["easy", "medium", "hard"]
    result = CliRunner().invoke(cli, ["stats", str(scored), "--bands", "easy=0.5,hard=1.5", "--no-plot"])
    assert result.exit_code == 0, result.output
    assert "easy > 0.5" in result.output and "hard > 1.5" in result.output
    for bad in ("", "1,0.5", "a", "-1,2", "1,1", "a=1,2"):
        with pytest.raises(ValueError):
            compute_stats(scored, bad)
        result = CliRunner().invoke(cli, ["stats", str(scored), "--bands", bad, "--no-plot"])
        assert result.exit_code == 2 and "Traceback" not in result.output, (bad, result.output)


def test_connect_needs_a_finished_scored_dir(prep, tmp_path):
    with pytest.raises(MissingUpstream):
        connect(tmp_path)
    with pytest.raises(MissingUpstream, match="expected the output of `rpt score-entropy`"):
        connect(prep)


def test_docs_view_from_moved_prepared_dir(prep, scored, tmp_path):
    import shutil

    moved = tmp_path / "scored"
    shutil.copytree(scored, moved)
    m = json.loads((moved / "manifest.json").read_text())
    m["prepared"]["dir"] = str(tmp_path / "gone")
    (moved / "manifest.json").write_text(json.dumps(m))
    con = connect(moved)  # positions still work; docs is missing with a hint
    assert con.sql("SELECT count(*) FROM positions").fetchall()[0][0] > 0
    with pytest.raises(BadInput, match="--prepared"):
        query_rows(moved, "SELECT count(*) FROM docs")
    assert query_rows(moved, "SELECT count(*) FROM docs", prepared=prep)[1] == [(len(TEXTS),)]


def test_cli_query_and_stats(scored, tmp_path):
    from cli.main import cli

    runner = CliRunner()
    r = runner.invoke(cli, ["query", str(scored), "SELECT doc_id, count(*) AS n FROM positions GROUP BY 1 ORDER BY 1"])
    assert r.exit_code == 0, r.output
    assert r.output.splitlines()[0].split() == ["doc_id", "n"] and "(4 rows)" in r.output
    r = runner.invoke(cli, ["query", str(scored), "SELECT pos FROM positions ORDER BY pos LIMIT 3", "--format", "csv"])
    assert r.exit_code == 0 and r.output.splitlines()[0] == "pos", r.output  # failed once (exit 1) in a loaded full run
    r = runner.invoke(cli, ["query", str(scored), "SELECT 1", "--format", "parquet"])
    assert r.exit_code == 2 and "--output" in r.output
    r = runner.invoke(cli, ["query", str(scored), "SELECT * FROM positions", "-o", str(tmp_path / "x.csv")])
    assert r.exit_code == 0 and "(csv)" in r.output
    r = runner.invoke(cli, ["stats", str(scored), "--bands", "0.5,1.0,1.5,2.0", "--plot", str(tmp_path / "p.png")])
    assert r.exit_code == 0, r.output
    assert "> 2.0" in r.output and str(tmp_path / "p.png") in r.output and (tmp_path / "p.png").exists()
    r = runner.invoke(cli, ["stats", str(scored), "--json", "--no-plot"])
    assert r.exit_code == 0 and json.loads(r.output)["positions_kept"] > 0
    r = runner.invoke(cli, ["stats", str(scored), "--bands", "1,0.5"])
    assert r.exit_code == 2 and "increasing" in r.output


def test_documents_without_positions(tmp_path):
    """A shard whose documents are all one token long gives an empty (but valid) positions shard."""
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["Hi", "A", "Hello world, again."]))
    prep = tmp_path / "prep"
    run_prepare(PrepareConfig(inputs=(str(corpus),), out=str(prep), shard_docs=2, progress=False))
    m = _score(prep, tmp_path / "scored", keep_all=True, save_topk=True)
    first = pq.read_table(tmp_path / "scored" / "positions" / "part-00000.parquet")
    assert first.num_rows == 0 and "topk_ids" in first.schema.names
    assert m["counts"]["documents_without_positions"] == 2
    assert m["counts"]["positions_skipped_short_context"] == 3
    s = compute_stats(tmp_path / "scored")
    assert s["positions_kept"] == m["counts"]["positions_kept"] > 0


def test_band_rule_sql_form_agrees_with_its_python_form():
    """`band_sql` (DuckDB) names the band `band_of` (Python) names, on random entropies and band
    sets: unsorted bands, bands sharing a threshold, entropies exactly at a threshold (in float32
    and float64 columns), NaN, None, +-inf."""
    import duckdb
    import pyarrow as pa

    from rptdata.bands import band_of, band_sql

    rng = np.random.default_rng(0)
    con = duckdb.connect()
    for trial in range(60):
        k = int(rng.integers(1, 5))
        if trial % 2:  # exact in float32 too: ties in either column type, and bands sharing a threshold
            thresholds = (rng.integers(0, 12, k) * 0.25).tolist()
        else:  # arbitrary doubles: a float32 column's values never equal them, only come close
            thresholds = rng.uniform(0, 3, k).tolist()
        bands = [(f"b{i}", float(t)) for i, t in enumerate(thresholds)]
        if trial % 3 == 0:
            bands = dict(bands)
        values = rng.uniform(-0.5, 3.5, 300).tolist() + thresholds
        values += [float(np.float32(t)) for t in thresholds] + [float(np.nextafter(t, 9)) for t in thresholds]
        values += [float("nan"), None, float("inf"), float("-inf"), 0.0]
        for kind in (pa.float32(), pa.float64()):
            table = pa.table({"i": np.arange(len(values)), "e": pa.array(values, kind)})
            con.register("t", table)
            sql = [r[0] for r in con.execute(f"SELECT {band_sql('e', bands)} FROM t ORDER BY i").fetchall()]
            python = [band_of(e, bands) for e in table.column("e").to_pylist()]
            assert sql == python, (bands, kind, [(e, s, p) for e, s, p in zip(values, sql, python) if s != p][:5])
            con.unregister("t")
