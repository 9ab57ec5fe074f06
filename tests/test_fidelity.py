"""Tests of `rpt stats A --compare B` (rptdata/fidelity.py): two scorings of one prepared corpus
made with fake scorers of known entropies, so every figure has an exact expected value.

Run: .venv/bin/python -m pytest -q tests/test_fidelity.py
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from scipy.stats import kendalltau, spearmanr

from rptdata.errors import BadInput
from rptdata.fidelity import compare_scorings
from rptdata.prepare import PrepareConfig, run_prepare
from rptdata.score import ScoreConfig, run_score_entropy
from rptdata.scorers import PositionScores
from tests.test_query import TEXTS
from tests.test_query import FakeScorer as QueryFakeScorer


def entropy_a(target):
    return (37 * target) % 300 / 100


class FakeScorer(QueryFakeScorer):
    """Entropy = fn(target token id): deterministic, no model."""

    def __init__(self, fn):
        self.fn = fn

    def score(self, sequences, firsts, progress=None):
        for i, (seq, first) in enumerate(zip(sequences, firsts)):
            target = np.asarray(seq, dtype=np.int64)[first:]
            entropy = self.fn(target).astype(np.float32)
            yield (
                i,
                PositionScores(
                    entropy=entropy,
                    target_logprob=-entropy,
                    target_rank=np.ones(len(target), np.int32),
                    top1_id=target.astype(np.int32),
                    topk_ids=np.tile(target[:, None], (1, 16)).astype(np.int32),
                    topk_logprobs=np.zeros((len(target), 16), np.float32),
                ),
            )


def _prep(root: Path, texts) -> Path:
    corpus = root / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    run_prepare(PrepareConfig(inputs=(str(corpus),), out=str(root / "prep"), shard_docs=2, progress=False))
    return root / "prep"


def _score(prep, out, fn, **kw):
    run_score_entropy(
        ScoreConfig(prepared=str(prep), out=str(out), max_context=16, progress=False, keep_all=True, **kw),
        scorer=FakeScorer(fn),
    )
    return out


@pytest.fixture(scope="module")
def scorings(tmp_path_factory):
    root = tmp_path_factory.mktemp("fid")
    prep = _prep(root, TEXTS)
    a = _score(prep, root / "a", entropy_a)
    same = _score(prep, root / "same", lambda t: entropy_a(t) / 2)  # a monotone map: the same ranking
    other = _score(prep, root / "other", lambda t: (53 * t) % 290 / 100)
    other_prep = _prep(tmp_path_factory.mktemp("fid2"), TEXTS[:2])
    foreign = _score(other_prep, other_prep.parent / "foreign", entropy_a)
    return {"a": a, "same": same, "other": other, "foreign": foreign}


def _pairs(a_dir, b_dir):
    ta = pq.read_table(a_dir / "positions").to_pandas()
    tb = pq.read_table(b_dir / "positions").to_pandas()
    j = ta.merge(tb, on=["doc_id", "pos"])
    return j["entropy_x"].to_numpy(np.float64), j["entropy_y"].to_numpy(np.float64)


def _band(h):
    return np.where(h > 1.5, "hard", np.where(h > 1.0, "medium", np.where(h > 0.5, "easy", "other")))


def test_monotone_rescoring_agrees_perfectly_in_rank(scorings):
    c = compare_scorings(scorings["a"], scorings["same"])
    assert c["shared_positions"] == c["a"]["positions"] == c["b"]["positions"] > 50
    assert c["spearman"] == pytest.approx(1.0)
    assert c["kendall"] == pytest.approx(1.0)
    # halved entropies move positions down the bands: nothing of A's hard is B's hard unless > 3.0
    ea, eb = _pairs(scorings["a"], scorings["same"])
    assert c["b_hard"] == int((eb > 1.5).sum()) == 0


def test_figures_match_scipy_and_numpy(scorings):
    c = compare_scorings(scorings["a"], scorings["other"], keep_thresholds=(0.0, 1.0, 2.0))
    ea, eb = _pairs(scorings["a"], scorings["other"])
    assert c["shared_positions"] == len(ea)
    assert c["spearman"] == pytest.approx(spearmanr(ea, eb).statistic, abs=1e-9)
    assert c["kendall"] == pytest.approx(kendalltau(ea, eb).statistic, abs=1e-9)
    ba, bb = _band(ea), _band(eb)
    for r in ("other", "easy", "medium", "hard"):
        for col in ("other", "easy", "medium", "hard"):
            assert c["band_matrix"][r][col] == int(((ba == r) & (bb == col)).sum())
    assert c["band_agreement"] == pytest.approx(float((ba == bb).mean()))
    hard = eb > 1.5
    assert c["b_hard"] == int(hard.sum()) > 0
    for k, t in zip(c["keep"], (0.0, 1.0, 2.0)):
        assert k["b_hard_kept"] == int((hard & (ea >= t)).sum())
        assert k["a_kept_share"] == pytest.approx(float((ea >= t).mean()))
    assert c["keep"][0]["b_hard_kept_share"] == 1.0  # threshold 0 keeps everything


def test_kendall_on_a_sample_when_large(scorings):
    c = compare_scorings(scorings["a"], scorings["other"], kendall_sample=40)
    assert c["kendall_positions"] == 40 < c["shared_positions"]
    assert -1.0 <= c["kendall"] <= 1.0


def test_refuses_scorings_of_different_corpora(scorings):
    with pytest.raises(BadInput, match=r"a/manifest.json scored the prepared corpus .*foreign/manifest.json scored"):
        compare_scorings(scorings["a"], scorings["foreign"])


def test_cli_prints_correlations_matrix_and_writes_plot(scorings, tmp_path):
    from cli.main import cli

    plot = tmp_path / "fid.png"
    r = CliRunner().invoke(cli, ["stats", str(scorings["a"]), "--compare", str(scorings["other"]), "--plot", str(plot)])
    assert r.exit_code == 0, r.output
    assert "Spearman" in r.output and "Kendall tau-b" in r.output
    assert "band agreement (rows A, columns B" in r.output and "hard" in r.output
    assert plot.stat().st_size > 1000
    r = CliRunner().invoke(cli, ["stats", str(scorings["a"]), "--compare", str(scorings["foreign"]), "--no-plot"])
    assert r.exit_code != 0 and "manifest.json" in r.output and "Traceback" not in r.output


@pytest.mark.slow
def test_cli_subprocess_json(scorings, tmp_path):
    rpt = Path(sys.executable).parent / "rpt"
    out = subprocess.run(
        [str(rpt), "stats", str(scorings["a"]), "--compare", str(scorings["same"]), "--json", "--no-plot"],
        capture_output=True,
        text=True,
        check=True,
    )
    got = json.loads(out.stdout)
    assert got["spearman"] == pytest.approx(1.0) and "sample" not in got
