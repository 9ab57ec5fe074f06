"""The live-group estimate (rptdata/tasks/live.py) and its use in `rpt make-tasks` and the task readers:
brute force over every G-sample outcome on a tiny vocabulary, property tests of the temperature
approximation, the --min-live filter's accounting, top-k tokens judged by the prefix rule.

Run: .venv/bin/python -m pytest -q tests/test_live.py
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from cli.main import cli
from rptdata.io import list_shards, read_manifest
from rptdata.spans import ByteSpanTokenizer
from rptdata.stage import StageDir
from rptdata.tasks import SKIP_REASONS, run_make_tasks
from rptdata.tasks.live import (
    accepted_prediction,
    live_probability,
    position_accept_mass,
    predicted_zero_variance,
    tempered_accept_mass,
)
from rpttrain.data import OPTIONAL_TASK_COLUMNS, TASK_COLUMNS, TaskRows
from rpttrain.reward import prefix_reward
from tests.rpt_fixtures import rewrite_shard
from tests.test_tasks import build_scored, cfg, corpus_texts, pick_seed, read_docs, read_split

# ---------------------------------------------------------------------------------------------
# brute force: every outcome of G samples from a tiny vocabulary

# the continuation " paragraph is" in three tokens; the vocabulary spells it several ways
CONTINUATION, BOUNDARIES = " paragraph is", [5, 10, 13]
VOCAB = [b" para", b" paragraph", b" par", b"graph", b" paragraph is", b" the", "世".encode()[:2]]


def brute_force_live(probs: list[float], temperature: float, group_size: int) -> float:
    """P(mixed rewards) by enumerating all len(VOCAB)**G groups, each scored with the real reward."""
    w = np.asarray(probs) ** (1.0 / temperature)
    w = w / w.sum()
    rewards = [prefix_reward(t.decode("utf-8", errors="replace"), CONTINUATION, BOUNDARIES) for t in VOCAB]
    mixed = 0.0
    for group in itertools.product(range(len(VOCAB)), repeat=group_size):
        scores = {rewards[i] for i in group}
        if len(scores) > 1:
            mixed += float(np.prod(w[list(group)]))
    return mixed


@settings(max_examples=25, deadline=None)
@given(
    raw=st.lists(st.floats(0.01, 1.0), min_size=len(VOCAB), max_size=len(VOCAB)),
    temperature=st.sampled_from([0.5, 0.8, 1.0, 1.3]),
    group_size=st.integers(2, 4),
)
def test_live_matches_brute_force_count_on_a_tiny_vocabulary(raw, temperature, group_size):
    probs = [x / sum(raw) for x in raw]
    cont = CONTINUATION.encode()
    ok = [accepted_prediction(t, cont, BOUNDARIES) for t in VOCAB]
    assert ok == [True, True, False, False, True, False, False]  # the prefix rule, token by token
    # the whole vocabulary is "saved top-k" (best first): no unknown mass, so the estimate is exact
    order = sorted(range(len(VOCAB)), key=lambda i: -probs[i])
    topk = ([i for i in order], [math.log(probs[i]) for i in order], [ok[i] for i in order])
    q = position_accept_mass(math.log(probs[0]), True, temperature, topk, target_id=0)
    assert live_probability(q, group_size) == pytest.approx(brute_force_live(probs, temperature, group_size), abs=1e-9)


# ---------------------------------------------------------------------------------------------
# properties of the pieces


@given(q=st.floats(0.0, 1.0), g=st.integers(1, 64))
def test_live_is_symmetric_bounded_and_peaks_at_one_half(q, g):
    live = live_probability(q, g)
    assert live == pytest.approx(live_probability(1.0 - q, g), abs=1e-12)
    assert 0.0 <= live <= 1.0 - 2.0 ** (1 - g) + 1e-12
    assert live <= live_probability(0.5, g) + 1e-12


def _distribution(draw_probs):
    p = np.asarray(draw_probs, dtype=float)
    return p / p.sum()


@settings(max_examples=100, deadline=None)
@given(
    raw=st.lists(st.floats(1e-4, 1.0), min_size=3, max_size=40),
    k=st.integers(1, 16),
    accept=st.lists(st.booleans(), min_size=16, max_size=16),
    temperature=st.floats(0.2, 3.0),
)
def test_flat_tail_bounds_the_true_tempered_mass(raw, k, accept, temperature):
    """With the top-k saved, every unsaved token has p <= p_k: for T <= 1 the estimate is a lower
    bound of the true tempered accepted mass, for T >= 1 an upper bound, and at T = 1 exact."""
    p = np.sort(_distribution(raw))[::-1]
    k = min(k, len(p))
    acc = accept[:k]
    w = p ** (1.0 / temperature)
    true_q = float(sum(w[i] for i in range(k) if acc[i]) / w.sum())
    lps = [math.log(x) for x in p[:k]]
    est = tempered_accept_mass(lps, acc, temperature, lps[-1])
    if temperature <= 1.0:
        assert est <= true_q + 1e-9
    if temperature >= 1.0:
        assert est >= true_q - 1e-9
    exact_at_1 = tempered_accept_mass(lps, acc, 1.0, lps[-1])
    assert exact_at_1 == pytest.approx(float(sum(p[i] for i in range(k) if acc[i])), abs=1e-9)


@given(lp=st.floats(-20.0, 0.0), temperature=st.floats(0.1, 2.0))
def test_target_only_estimate(lp, temperature):
    q = position_accept_mass(lp, True, temperature)
    assert 0.0 <= q <= 1.0
    assert position_accept_mass(lp, False, temperature) == 0.0  # a target inside a character never scores
    assert position_accept_mass(lp, True, 1.0) == pytest.approx(math.exp(lp), rel=1e-9)
    # the flat tail at p(target): p**(1/T) / (p**(1/T) + (1-p) * p**(1/T - 1)) = p exactly, at any T
    assert q == pytest.approx(math.exp(lp), rel=1e-6, abs=1e-12)


def test_more_accepted_tokens_never_lower_q():
    lps = [math.log(x) for x in (0.4, 0.3, 0.2)]
    qs = [
        tempered_accept_mass(lps, flags, 0.8, lps[-1])
        for flags in ([True, False, False], [True, False, True], [True, True, True])
    ]
    assert qs[0] < qs[1] < qs[2] <= 1.0
    assert math.isnan(tempered_accept_mass([math.nan], [True], 0.8, math.nan))
    with pytest.raises(ValueError, match="temperature"):
        tempered_accept_mass(lps, [True] * 3, 0.0, lps[-1])


def test_predicted_zero_variance_of_a_batch():
    rows = [{"accept_mass": 0.5, "live": 0.0}, {"accept_mass": 1.0, "live": 0.0}, {"task_id": "old"}]
    assert predicted_zero_variance(rows, group_size=2) == pytest.approx((0.5 + 1.0) / 2)
    assert predicted_zero_variance(rows) == 1.0  # the stored live (for make-tasks' G)
    assert predicted_zero_variance([{"live": None}, {"live": float("nan")}]) is None


# ---------------------------------------------------------------------------------------------
# make-tasks


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    # the last text has "\n" "\n" as two tokens although "\n\n" is one (the pre-tokenizer splits them)
    texts = corpus_texts() + ["Let x=1; y=2;\n\nz = x + y, so z = 3."]
    scored_dir, prep = build_scored(tmp_path_factory.mktemp("live_src"), texts=texts)
    docs = read_docs(prep)
    return scored_dir, prep, docs, pick_seed(list(docs), 0.3)


def test_tasks_carry_q_and_live_and_min_live_counts_reconcile(scored, tmp_path):
    full = run_make_tasks(cfg(scored, tmp_path / "full", temperature=0.7, group_size=4))
    rows = read_split(tmp_path / "full", "train") + read_split(tmp_path / "full", "eval")
    assert full["counts"]["skipped"]["low_live"] == 0  # off by default
    whole = 0
    for r in rows:  # no top-k saved: the target alone, with the tail at p(target)
        cont = r["continuation"].encode()
        target_ok = accepted_prediction(cont[: r["boundaries"][0]], cont, r["boundaries"])
        whole += target_ok  # a first token that ends inside a character never scores alone
        assert r["accept_mass"] == pytest.approx(position_accept_mass(r["target_logprob"], target_ok, 0.7), rel=1e-5)
        assert r["live"] == pytest.approx(live_probability(r["accept_mass"], 4), rel=1e-5, abs=1e-7)
    assert 0 < whole < len(rows)
    for split in ("train", "eval"):
        mine = [r["live"] for r in read_split(tmp_path / "full", split)]
        assert full["counts"]["predicted_live"][split] == pytest.approx(sum(mine) / len(mine), rel=1e-5)
    assert full["live_estimate"]["group_size"] == 4 and full["live_estimate"]["temperature"] == 0.7

    threshold = float(np.median([r["live"] for r in read_split(tmp_path / "full", "train")]))
    m = run_make_tasks(cfg(scored, tmp_path / "live", temperature=0.7, group_size=4, min_live=threshold))
    c = m["counts"]
    assert set(c["skipped"]) == set(SKIP_REASONS)
    assert c["positions_in"] == c["tasks"]["train"] + c["tasks"]["eval"] + sum(c["skipped"].values())
    below = [r for r in read_split(tmp_path / "full", "train") if r["live"] < threshold]
    assert 0 < c["skipped"]["low_live"] == len(below)
    assert c["tasks"]["train"] == full["counts"]["tasks"]["train"] - len(below)
    assert all(r["live"] >= threshold for r in read_split(tmp_path / "live", "train"))
    assert read_split(tmp_path / "live", "eval") == read_split(tmp_path / "full", "eval")  # never filtered
    assert c["predicted_live"]["train"] > full["counts"]["predicted_live"]["train"]
    # the caps sample among the live tasks: low_live first, then over_max_tasks
    capped = run_make_tasks(
        cfg(scored, tmp_path / "cap", temperature=0.7, group_size=4, min_live=threshold, max_tasks=5)
    )
    assert capped["counts"]["skipped"]["low_live"] == len(below)
    assert capped["counts"]["skipped"]["over_max_tasks"] == c["tasks"]["train"] - 5


def _merged_token_position(docs, spans):
    """A (doc_id, pos, merged id) where tokens pos and pos+1 together are one vocabulary token."""
    by_bytes = {b: i for i, b in enumerate(spans.token_bytes) if b}
    for doc_id, doc in docs.items():
        ids = doc["token_ids"]
        for pos in range(1, len(ids) - 1):
            both = spans.token_bytes[ids[pos]] + spans.token_bytes[ids[pos + 1]]
            if both in by_bytes and by_bytes[both] not in ids[pos : pos + 2]:
                return doc_id, pos, by_bytes[both]
    raise AssertionError("no two tokens of the corpus spell a third")


def test_topk_tokens_spanning_whole_continuation_tokens_count(scored, tmp_path, smollm2_tokenizer):
    spans = ByteSpanTokenizer(smollm2_tokenizer)
    docs = scored[2]
    doc_id, pos, merged = _merged_token_position(docs, spans)
    # a copy of the scored directory whose positions carry top-k, as `score-entropy --save-topk` writes
    src = read_manifest(scored[0], "score-entropy")
    out = tmp_path / "scored_topk"
    stage = StageDir(out, "score-entropy", ["positions"])
    stage.begin({"copy_of": src["fingerprint"], "save_topk": True})
    other = spans.token_bytes.index(b" the")
    for path in list_shards(scored[0] / "positions"):
        t = pq.read_table(path)
        ids, lps = [], []
        for d, p, tok in zip(*(t.column(c).to_pylist() for c in ("doc_id", "pos", "token_id"))):
            if (d, p) == (doc_id, pos):  # target 0.5, the merged token 0.3 (accepted), " the" 0.1
                ids.append([tok, merged, other])
                lps.append([math.log(0.5), math.log(0.3), math.log(0.1)])
            else:
                ids.append([])
                lps.append([])
        t = t.set_column(
            t.schema.get_field_index("target_logprob"),
            "target_logprob",
            pa.array(
                [
                    math.log(0.5) if (d, p) == (doc_id, pos) else lp
                    for d, p, lp in zip(
                        t.column("doc_id").to_pylist(),
                        t.column("pos").to_pylist(),
                        t.column("target_logprob").to_pylist(),
                    )
                ],
                pa.float32(),
            ),
        )
        t = t.append_column("topk_ids", pa.array(ids, pa.list_(pa.int32())))
        t = t.append_column("topk_logprobs", pa.array(lps, pa.list_(pa.float32())))
        stage.write_shard("positions", int(path.stem.split("-")[1]), t, {"positions": t.num_rows})
    stage.finish({**{k: src[k] for k in ("tokenizer", "proxy", "prepared")}, "options": {"save_topk": True}})

    for temperature, expected in ((1.0, 0.8), (0.5, (0.25 + 0.09) / (0.25 + 0.09 + 0.01 + 0.1 * 0.1))):
        target = tmp_path / f"tasks_{temperature}"
        m = run_make_tasks(cfg((out, *scored[1:]), target, temperature=temperature, eval_fraction=0.0))
        assert m["live_estimate"]["topk"] is True
        row = next(r for r in read_split(target, "train") if r["task_id"] == f"{doc_id}@{pos}")
        assert row["accept_mass"] == pytest.approx(expected, rel=1e-5)
        assert row["live"] == pytest.approx(live_probability(expected, 8), rel=1e-5)


def test_min_live_cli_and_help(scored, tmp_path):
    r = CliRunner().invoke(cli, ["make-tasks", "--help"])
    assert r.exit_code == 0 and "exact only when the policy is the proxy" in " ".join(r.output.split())
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
        "16",
        "--min-live",
        "0.3",
        "--group-size",
        "4",
        "--no-progress",
    ]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    m = read_manifest(out, "make-tasks")
    assert m["counts"]["skipped"]["low_live"] > 0 and m["options"]["min_live"] == 0.3
    assert f"predicted live groups (G=4, T=0.8): train {100 * m['counts']['predicted_live']['train']:.1f}%" in r.output
    r = CliRunner().invoke(cli, [*args[:-3], "--min-live", "1.5", "--no-progress"])
    assert r.exit_code == 2 and "1.5" in r.output


# ---------------------------------------------------------------------------------------------
# readers


def test_task_rows_carry_live_when_present_and_old_dirs_still_load(scored, tmp_path):
    out = tmp_path / "t"
    run_make_tasks(cfg(scored, out))
    rows = TaskRows(out, cache=tmp_path / "cache").take([0, 1])
    assert set(rows[0]) == set(TASK_COLUMNS + OPTIONAL_TASK_COLUMNS) and rows[0]["live"] is not None
    assert predicted_zero_variance(rows, group_size=8) == pytest.approx(
        np.mean([1 - live_probability(r["accept_mass"], 8) for r in rows])
    )
    # an older tasks directory: the shards lack both columns
    for path in list_shards(out / "train"):
        t = pq.read_table(path)
        rewrite_shard(out, path, t.drop_columns(OPTIONAL_TASK_COLUMNS))
    old = TaskRows(out, cache=tmp_path / "cache").take([0])
    assert set(old[0]) == set(TASK_COLUMNS)
    assert predicted_zero_variance(old, group_size=8) is None
