"""`rpt eval`: hand values of the statistics, ntp accuracy against an independent loop on the
embedded model, reasoning mode, checkpoints of a real tiny run with scaling fits, the held-out
check, resume and the CLI.

Run: .venv/bin/python -m pytest -q tests/test_eval.py
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from cli.main import cli
from rptdata.bands import DEFAULT_BANDS
from rptdata.errors import ManifestMismatch
from rpttrain.eval import (
    PREDICTIONS_SCHEMA,
    EvalConfig,
    EvalOverlap,
    band_table,
    disjoint_counts,
    markdown,
    pass_at_k,
    passes,
    run_eval,
    wilson_interval,
)
from rpttrain.eval import report as eval_report
from tests.rpt_fixtures import tiny_llama, tiny_train_config, write_tasks_dir

# ---------------------------------------------------------------------------------------------
# pure helpers


def test_wilson_interval_hand_values():
    # p = 0.5, n = 10: centre 0.5, half-width 1.96 * sqrt(0.025 + 1.96^2/400) / (1 + 1.96^2/10)
    lo, hi = wilson_interval(5, 10)
    assert (lo, hi) == pytest.approx((0.23659, 0.76341), abs=1e-5)
    # k = 0: the upper end is (z^2/n) / (1 + z^2/n) = 0.38416 / 1.38416
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.27754), abs=1e-5)
    assert wilson_interval(10, 10) == pytest.approx((0.72246, 1.0), abs=1e-5)
    # p = 81/263: centre 0.310745, half-width 0.055462 (worked by hand)
    assert wilson_interval(81, 263) == pytest.approx((0.25528, 0.36621), abs=1e-5)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    lo99, hi99 = wilson_interval(5, 10, z=2.576)
    assert lo99 < lo and hi99 > hi
    with pytest.raises(ValueError):
        wilson_interval(11, 10)


def test_pass_at_k_is_the_unbiased_estimator():
    assert pass_at_k(8, 0, 8) == 0.0
    assert pass_at_k(8, 1, 8) == 1.0
    assert pass_at_k(8, 1, 1) == pytest.approx(0.125)
    assert pass_at_k(4, 2, 2) == pytest.approx(1 - 1 / 6)  # 1 - C(2,2)/C(4,2)
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - math.comb(7, 5) / math.comb(10, 5))
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                want = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(want, abs=1e-12)
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)


def test_band_table_is_nested_and_disjoint_counts_add_up():
    h = [0.2, 0.6, 0.9, 1.0, 1.2, 1.5, 1.6, 3.0]
    s = [1, 1, 0, 1, 0, 1, 1, 0]
    t = band_table(h, s)
    assert [t[b]["n"] for b in ("easy", "medium", "hard", "all")] == [
        7,
        4,
        2,
        8,
    ]  # strictly greater: 1.0, 1.5 fall lower
    assert t["easy"]["correct"] == 4 and t["hard"]["accuracy"] == 0.5
    assert (t["hard"]["ci_low"], t["hard"]["ci_high"]) == pytest.approx(wilson_interval(1, 2))
    d = disjoint_counts(h)
    assert d == {"other": 1, "easy": 3, "medium": 2, "hard": 2}
    assert sum(d.values()) == len(h)
    empty = band_table([0.1], [1.0])["hard"]
    assert empty["n"] == 0 and empty["accuracy"] is None and empty["ci_low"] is None
    frac = band_table([2.0, 2.0], [0.5, 0.25], bands="hi=1")  # mean rewards of K samples
    assert frac["hi"]["correct"] == 0.75 and frac["hi"]["accuracy"] == 0.375


def test_plan_batches_by_rows_cover_every_index_once():
    from rptdata.batching import plan_batches

    plan = plan_batches([5, 1, 9, 3, 7], max_rows=2)
    assert plan == [[2, 4], [0, 3], [1]]
    assert sorted(i for b in plan for i in b) == list(range(5))


def test_cli_options_are_evalconfigs_fields(tmp_path, monkeypatch):
    """`rpt eval`'s options are generated from EvalConfig's fields: each sets its field, the
    defaults are the fields' (smollm2-135m when no model or run is given), and --help has them all."""
    from dataclasses import fields

    import rpttrain.eval

    seen = {}

    def fake_run_eval(config):
        seen["config"] = config
        raise SystemExit(0)

    monkeypatch.setattr(rpttrain.eval, "run_eval", fake_run_eval)  # what cli/eval.py calls
    (tmp_path / "tasks").mkdir()
    r = CliRunner().invoke(cli, ["eval", str(tmp_path / "tasks"), "--no-progress"])
    assert r.exit_code == 0, r.output
    want = EvalConfig(tasks_dir=str(tmp_path / "tasks"), models=("smollm2-135m",), progress=False)
    assert seen["config"] == want
    args = ["--model", "a", "--model", "b", "--checkpoints", str(tmp_path), "--lm-eval-tasks", "x,y", "--mode", "both"]
    args += ["--bands", "lo=0.2,hi=2", "-o", str(tmp_path / "o"), "--allow-overlap", "--trust-remote-code"]
    assert CliRunner().invoke(cli, ["eval", str(tmp_path / "tasks"), *args]).exit_code == 0
    c = seen["config"]
    assert (c.models, c.checkpoints, c.lm_eval_tasks, c.mode) == (("a", "b"), (str(tmp_path),), ("x", "y"), "both")
    assert (c.bands, c.out, c.allow_overlap, c.trust_remote_code) == (
        (("lo", 0.2), ("hi", 2.0)),
        str(tmp_path / "o"),
        True,
        True,
    )
    text = CliRunner().invoke(cli, ["eval", "--help"], terminal_width=200).output
    for f in fields(EvalConfig):
        flag = f.metadata.get("flag") or ("--no-progress" if f.name == "progress" else "--" + f.name.replace("_", "-"))
        assert f.name == "tasks_dir" or flag in text, flag


def test_config_rejects_bad_combinations(tmp_path):
    with pytest.raises(ValueError, match="nothing to evaluate"):
        EvalConfig(tasks_dir="t")
    with pytest.raises(ValueError, match="temperature > 0"):
        EvalConfig(tasks_dir="t", models=("m",), samples=4, temperature=0.0)
    with pytest.raises(ValueError, match="--resume needs --out"):
        EvalConfig(tasks_dir="t", models=("m",), resume=True)
    with pytest.raises(ValueError, match="--mode"):
        EvalConfig(tasks_dir="t", models=("m",), mode="bogus")
    with pytest.raises(ValueError, match="unknown prompt format"):
        EvalConfig(tasks_dir="t", models=("m",), prompt_template="v99")
    with pytest.raises(ValueError, match="thresholds must be numbers"):
        EvalConfig(tasks_dir="t", models=("m",), bands="a,b")
    assert EvalConfig(tasks_dir="t", models=("m",), bands="0.5,1.0,1.5").bands == DEFAULT_BANDS
    assert EvalConfig(tasks_dir="t", models=("m",), mode="both").modes == ("ntp", "reasoning")


# ---------------------------------------------------------------------------------------------
# the embedded model on real text: run_eval equals a plain loop


def champ_pairs(tokenizer, n: int, seed: int = 0, context_tokens: int = 32, k: int = 8) -> list[tuple[str, str]]:
    """(context, continuation) at random positions of CHAMP problems+solutions, cut on token
    boundaries of `tokenizer` (rptdata.tasks.taskdef helpers, as make-tasks does)."""
    from rptdata.sources import TextBuilder, expand_inputs, read_source
    from rptdata.spans import ByteSpanTokenizer
    from rptdata.tasks.taskdef import continuation_at, cut_context

    texts = [r.text for r in read_source(expand_inputs(["builtin:champ"])[0], TextBuilder()) if r.text]
    rng = random.Random(seed)
    docs = rng.sample(range(len(texts)), n * 2)
    batch = ByteSpanTokenizer(tokenizer).encode_batch([texts[d] for d in docs])
    pairs = []
    for j, d in enumerate(docs):
        ends = batch.ends[batch.offsets[j] : batch.offsets[j + 1]]
        pos = rng.randrange(8, len(ends) - 1)
        try:
            ctx, _ = cut_context(texts[d].encode(), ends, pos, context_tokens)
            cont, _ = continuation_at(texts[d].encode(), ends, pos, k)
        except ValueError:  # a position inside a multi-byte character
            continue
        pairs.append((ctx, cont))
        if len(pairs) == n:
            break
    return pairs


ENTROPIES = [0.3, 0.7, 1.2, 1.8, 2.6, 1.1]


def test_ntp_matches_an_independent_loop_on_smollm2(tmp_path, smollm2_tokenizer):
    import torch

    from rptdata.models import load_causal_lm
    from rpttrain.reward import prefix_reward

    tok = smollm2_tokenizer
    pairs = champ_pairs(tok, 24)
    tasks = write_tasks_dir(tmp_path / "tasks", tok.name_or_path, pairs[:1], eval_pairs=pairs, entropies=ENTROPIES)
    report = run_eval(
        EvalConfig(
            tasks_dir=str(tasks),
            models=("smollm2-135m",),
            out=str(tmp_path / "rep"),
            device="cpu",
            batch_size=8,
            flush_every=10,
            progress=False,
        )
    )

    # the plain loop: one context at a time, no padding, argmax, decode, the training reward
    model = load_causal_lm("smollm2-135m", dtype="float32", device="cpu")
    eval_rows = pq.read_table(tasks / "eval" / "part-00000.parquet").to_pylist()
    hits, ents, preds = [], [], {}
    for task in eval_rows:
        ids = tok(task["context"], add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1].float()
        pred = tok.decode([int(logits.argmax())])
        preds[task["task_id"]] = pred
        hits.append(prefix_reward(pred, task["continuation"], task["boundaries"]))
        p = torch.softmax(logits, -1)
        ents.append(float(-(p * torch.log(p.clamp_min(1e-45))).sum()))
    want = {}
    for name, t in [*DEFAULT_BANDS, ("all", -math.inf)]:
        inside = [h for h, task in zip(hits, eval_rows) if task["entropy"] > t]
        want[name] = (len(inside), sum(inside))

    (row,) = report["rows"]
    assert row["mode"] == "ntp" and row["tasks"] == 24
    got = {b: (s["n"], s["correct"]) for b, s in row["bands"].items()}
    assert got == want
    assert 0 < want["all"][1] < 24  # real text: the model gets some right, not all
    assert row["model_entropy"] == pytest.approx(sum(ents) / len(ents), abs=1e-3)
    stored = pq.read_table(tmp_path / "rep" / "predictions.parquet").to_pylist()
    assert {r["task_id"]: r["prediction"] for r in stored} == preds
    assert len(list((tmp_path / "rep" / "predictions").glob("part-*.parquet"))) == 3  # flushed every 10 tasks
    assert report["band_counts"]["disjoint"]["other"] == 4 and report["band_counts"]["nested"]["easy"] == 20
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| smollm2-135m | ntp |" in md and "easy (H>0.5)" in md
    assert json.loads((tmp_path / "rep" / "report.json").read_text())["rows"][0]["bands"] == row["bands"]


# ---------------------------------------------------------------------------------------------
# a tiny random model: reasoning, checkpoints, the held-out check, resume, CLI

PAIRS = [
    ("The quick brown", " fox"),
    ("jumps over the", " lazy"),
    ("The lazy", " dog"),
    ("12345", "6"),
    ("héllo", " wörld"),
    ("naïve", " café"),
    ("quick brown fox", " jumps"),
    ("over the lazy", " dog"),
]
EVAL_PAIRS = [
    ("The brown", " fox"),
    ("a lazy", " dog"),
    ("1234", "5"),
    ("wörld", " 世界"),
    ("café", " naïve"),
    ("fox jumps", " over"),
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_bpe_dir):
    root = tmp_path_factory.mktemp("tiny_eval")
    model = tiny_llama(root / "model", tiny_bpe_dir)
    tasks = write_tasks_dir(root / "tasks", str(tiny_bpe_dir), PAIRS, eval_pairs=EVAL_PAIRS, entropies=ENTROPIES)
    return model, tasks


@pytest.fixture(scope="module")
def tiny_run(tiny, tmp_path_factory):
    """A real 3-step `rpt train` run of the tiny model, a checkpoint after every step."""
    from rpttrain.train import run_train

    model, tasks = tiny
    out = tmp_path_factory.mktemp("tiny_train") / "run"
    run_train(tiny_train_config(tasks, model, out, keep_checkpoints=5))
    return out


def tiny_config(tiny, out, **over) -> EvalConfig:
    model, tasks = tiny
    base = dict(
        tasks_dir=str(tasks),
        models=(str(model),),
        out=None if out is None else str(out),
        device="cpu",
        batch_size=4,
        progress=False,
    )
    base.update(over)
    return EvalConfig(**base)


def test_reasoning_mode_end_to_end_with_pass_at_k(tiny, tmp_path):
    report = run_eval(tiny_config(tiny, tmp_path / "rep", mode="both", samples=3, temperature=1.0, max_new_tokens=4))
    ntp, reasoning = report["rows"]
    assert (ntp["mode"], reasoning["mode"]) == ("ntp", "reasoning")
    assert reasoning["prompt_template"] == "v0" and reasoning["samples"] == 3 and reasoning["max_new_tokens"] == 4
    assert set(reasoning["pass_at_k"]) == {"easy", "medium", "hard", "all"}
    assert reasoning["model_entropy"] is None and ntp["model_entropy"] > 0
    table = pq.read_table(tmp_path / "rep" / "predictions.parquet")
    assert table.schema.names == [
        "task_id",
        "model",
        "mode",
        "sample",
        "prediction",
        "reward",
        "band",
        "entropy",
        "model_entropy",
        "new_tokens",
        "completion",
        "status",
    ]
    assert table.schema.equals(PREDICTIONS_SCHEMA)
    rows = table.to_pylist()
    assert len(rows) == len(EVAL_PAIRS) * (1 + 3)
    r_rows = [r for r in rows if r["mode"] == "reasoning"]
    assert sorted({r["sample"] for r in r_rows}) == [0, 1, 2]
    assert all(1 <= r["new_tokens"] <= 4 for r in r_rows)
    # a random model writes no \boxed{}: nothing to extract, nothing rewarded; its text is kept
    assert all(r["prediction"] is None and r["reward"] == 0.0 for r in r_rows)
    assert all(r["completion"] is not None and r["status"] is None for r in r_rows)
    assert all(r["completion"] is None for r in rows if r["mode"] == "ntp")
    assert {r["band"] for r in rows} <= {"other", "easy", "medium", "hard"}
    assert "Pass@3 (all)" in markdown.format_table(report)


def test_reasoning_with_the_continuation_format_scores_like_ntp(tiny, tmp_path):
    report = run_eval(tiny_config(tiny, tmp_path / "rep", mode="both", prompt_template="continuation"))
    ntp, reasoning = report["rows"]
    assert reasoning["max_new_tokens"] == 1 and reasoning["temperature"] == 0.0  # raw format: one greedy token
    assert reasoning["bands"] == ntp["bands"]
    rows = pq.read_table(tmp_path / "rep" / "predictions.parquet").to_pylist()
    by = {(r["task_id"], r["mode"]): r["prediction"] for r in rows}
    assert all(by[(t, "ntp")] == by[(t, "reasoning")] for t, m in by if m == "ntp")


def test_checkpoints_rows_compute_scaling_and_plot(tiny, tiny_run, tmp_path):
    from rpttrain.checkpoint import list_checkpoints

    report = run_eval(tiny_config(tiny, tmp_path / "rep", models=(), checkpoints=(str(tiny_run),)))
    steps = [json.loads((c / "state.json").read_text()) for c in list_checkpoints(tiny_run)]
    assert [s["step"] for s in steps] == [1, 2, 3]
    rows = report["rows"]
    assert [(r["model"], r["step"], r["mode"]) for r in rows] == [
        ("run@0", 0, "ntp"),
        ("run@1", 1, "ntp"),
        ("run@2", 2, "ntp"),
        ("run@3", 3, "ntp"),
    ]
    assert rows[0]["compute"] == 0.0
    assert [r["compute"] for r in rows[1:]] == [s["totals"]["flops"] for s in steps]
    assert 0 < rows[1]["compute"] < rows[2]["compute"] < rows[3]["compute"]
    fits = report["scaling"]
    assert {(f["run"], f["mode"], f["band"]) for f in fits} == {
        ("run", "ntp", b) for b in ("easy", "medium", "hard", "all")
    }
    assert all(f["points"] == 3 for f in fits)
    # three points for three parameters: no fit, and the report says why instead of printing numbers
    assert all(f["status"].startswith("no fit: 3 points") and f["alpha"] is None for f in fits)
    assert report["overlap"][0]["documents"] == 0  # eval split of the run's own tasks directory
    png = tmp_path / "rep" / "scaling.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = markdown.format_table(report)
    assert "| run@3 | 3 |" in table and "compute (FLOPs)" in table
    assert "## Scaling" in (tmp_path / "rep" / "report.md").read_text()


def test_scaling_fits_and_plot_from_report_rows(tmp_path):
    from rpttrain.scaling import plot_scaling, scaling_law

    bands = dict(DEFAULT_BANDS)
    compute = [0.0, 1e15, 3e15, 1e16, 3e16, 1e17]
    rows = []
    for step, c in enumerate(compute):
        acc = {
            b: 0.2 + 0.05 * i if c == 0 else float(scaling_law(c, -0.1 * 1e15**0.4, 0.4, 0.3 + 0.05 * i))
            for i, b in enumerate([*bands, "all"])
        }
        rows.append(
            {
                "run": "r",
                "model": f"r@{step}",
                "step": step,
                "compute": c,
                "mode": "ntp",
                "bands": {b: {"accuracy": a, "n": 100} for b, a in acc.items()},
            }
        )
    config = EvalConfig(tasks_dir="t", models=("m",))
    fits = eval_report.scaling_fits(config, rows)
    assert [f["band"] for f in fits] == ["easy", "medium", "hard", "all"]
    for i, f in enumerate(fits):
        assert f["status"] == "ok" and f["points"] == 5  # the step-0 row (C = 0) is left out
        assert f["alpha"] == pytest.approx(0.4, rel=1e-3) and f["p_star"] == pytest.approx(0.3 + 0.05 * i, abs=1e-4)
        assert f["r2"] == pytest.approx(1.0, abs=1e-6)
    report = {"rows": rows, "bands": bands, "scaling": fits}
    assert "| r | ntp | hard | 5 |" in markdown.format_scaling(report)
    plot_scaling(report, tmp_path / "s.png")
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"


def test_not_enough_checkpoints_says_so(tiny, tiny_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    shutil.rmtree(run / "checkpoints" / "step-000003")
    report = run_eval(tiny_config(tiny, None, models=(), checkpoints=(str(run),)))
    assert len(report["rows"]) == 3
    assert all(f["status"].startswith("no fit: 2 points") for f in report["scaling"])


def test_evaluating_the_training_split_is_refused(tiny, tiny_run, tmp_path):
    cfg = dict(models=(), checkpoints=(str(tiny_run),), split="train", limit=3)
    with pytest.raises(EvalOverlap, match="trained on 3 of the 3 evaluated documents"):
        run_eval(tiny_config(tiny, tmp_path / "rep", **cfg))
    assert not (tmp_path / "rep").exists()  # refused before anything was written
    report = run_eval(tiny_config(tiny, tmp_path / "rep", allow_overlap=True, **cfg))
    assert report["overlap"][0]["documents"] == 3
    assert any("NOT held-out" in w for w in report["warnings"])
    assert "NOT held-out" in (tmp_path / "rep" / "report.md").read_text()


def test_another_tasks_dir_is_checked_document_by_document(tiny, tiny_run, tmp_path, tiny_bpe_dir):
    # other tasks over some of the run's training documents, under a different split rule
    other = write_tasks_dir(tmp_path / "other", str(tiny_bpe_dir), [], eval_pairs=PAIRS[:2])
    # write_tasks_dir names documents "{split}-doc{i}": rename the eval ones to the run's training ids
    table = pq.read_table(other / "eval" / "part-00000.parquet").to_pylist()
    for row in table:
        row["doc_id"] = row["doc_id"].replace("eval-", "train-")
    import pyarrow as pa

    from rptdata.io import file_digest
    from rptdata.tasks.taskdef import TASKS_SCHEMA

    pq.write_table(pa.Table.from_pylist(table, schema=TASKS_SCHEMA), other / "eval" / "part-00000.parquet")
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["split"]["seed"] = 7
    manifest["files"]["eval/part-00000.parquet"].update(file_digest(other / "eval" / "part-00000.parquet"))
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EvalOverlap, match="trained on 2 of the 2"):
        run_eval(EvalConfig(tasks_dir=str(other), checkpoints=(str(tiny_run),), device="cpu", progress=False))


def test_whole_document_ntp_runs_count_every_train_document_of_their_rule(tmp_path, tiny_bpe_dir):
    from rptdata.tasks.taskdef import split_of
    from rpttrain.data import trained_on_record
    from rpttrain.eval import RunInfo, training_overlap

    run_tasks = write_tasks_dir(tmp_path / "run_tasks", str(tiny_bpe_dir), PAIRS[:2])  # rule: seed 0, fraction 0.5
    run_manifest = json.loads((run_tasks / "manifest.json").read_text())
    docs = [f"champ#{i}" for i in range(20)]
    in_train = {d for d in docs if split_of(d, 0, 0.5) == "train"}
    assert 0 < len(in_train) < len(docs)
    evaluated = write_tasks_dir(tmp_path / "other", str(tiny_bpe_dir), [], eval_pairs=PAIRS[:1])
    manifest = json.loads((evaluated / "manifest.json").read_text())
    manifest["split"]["seed"] = 7  # another rule: the check must read documents
    # both sources of rpttrain.data: task rows (rpt) and whole documents (ntp over all positions)
    for objective, want in (("rpt", set()), ("ntp", in_train)):
        record = trained_on_record(objective, "all", run_tasks, run_manifest)
        run = RunInfo("r", tmp_path, {}, "m", run_tasks.resolve(), (), trained_on=record)
        overlap, how = training_overlap(run, evaluated, manifest, "eval", set(docs))
        assert overlap == want, objective
    assert "split rule puts in train" in how
    # what the run records decides, not its config: the same documents with the record of a task-rows run
    run = RunInfo(
        "r",
        tmp_path,
        {"objective": "ntp", "ntp_positions": "all"},
        "m",
        run_tasks.resolve(),
        (),
        trained_on=trained_on_record("ntp", "tasks", run_tasks, run_manifest),
    )
    assert training_overlap(run, evaluated, manifest, "eval", set(docs))[0] == set()


def test_eval_reads_the_record_train_wrote(tiny, tiny_run, tmp_path):
    import shutil

    import yaml

    from rptdata.errors import MissingUpstream
    from rpttrain.data import TRAINED_ON, trained_on_record
    from rpttrain.eval import read_run

    _, tasks = tiny
    cfg = yaml.safe_load((tiny_run / "config.yaml").read_text())
    written = json.loads((tiny_run / TRAINED_ON).read_text())
    assert written == trained_on_record(
        cfg["objective"], cfg["ntp_positions"], cfg["tasks_dir"], json.loads((tasks / "manifest.json").read_text())
    )
    assert written["source"] == "task-rows" and written["tasks_dir"] == str(tasks.resolve())
    assert read_run(tiny_run).trained_on == written
    # a run directory from before train wrote the record: a clear error naming the file, or a warning
    old = tmp_path / "old" / "run"
    shutil.copytree(tiny_run, old)
    (old / TRAINED_ON).unlink()
    cfg = dict(models=(), checkpoints=(str(old),), limit=2)
    with pytest.raises(MissingUpstream, match=r"trained_on\.json is missing.*--allow-overlap.*--resume"):
        run_eval(tiny_config(tiny, None, **cfg))
    report = run_eval(tiny_config(tiny, None, allow_overlap=True, **cfg))
    assert report["overlap"] == [{"run": str(old.resolve()), "documents": None, "how": "unchecked"}]
    assert any(TRAINED_ON in w for w in report["warnings"])


@pytest.fixture
def forward_sizes(monkeypatch) -> list[int]:
    """The number of sequences in each ntp forward pass the evaluation runs."""
    seen: list[int] = []
    real = passes.next_token_pass

    def counting(model, id_lists, *args, **kwargs):
        seen.append(len(id_lists))
        return real(model, id_lists, *args, **kwargs)

    monkeypatch.setattr(passes, "next_token_pass", counting)
    return seen


def test_resume_skips_rows_already_done(tiny, tmp_path, monkeypatch, forward_sizes):
    seen = forward_sizes
    out = tmp_path / "rep"
    run_eval(tiny_config(tiny, out, limit=4, flush_every=2))
    assert sum(seen) == 4
    with pytest.raises(ManifestMismatch, match="--resume"):
        run_eval(tiny_config(tiny, out, limit=4))
    with pytest.raises(ManifestMismatch, match="max_prompt_tokens"):
        run_eval(tiny_config(tiny, out, resume=True, max_prompt_tokens=64))

    # a crash after the first chunk: the finished part survives and resume does the rest
    seen.clear()
    real_chunk = passes.ntp_chunk
    calls = []

    def crash_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_chunk(*args, **kwargs)

    monkeypatch.setattr(passes, "ntp_chunk", crash_second)
    with pytest.raises(KeyboardInterrupt):
        run_eval(tiny_config(tiny, out, resume=True, flush_every=1))  # limit None: 2 more tasks to do
    assert sum(seen) == 1
    monkeypatch.setattr(passes, "ntp_chunk", real_chunk)
    seen.clear()
    report = run_eval(tiny_config(tiny, out, resume=True))
    assert sum(seen) == 1  # only the task the crash lost
    (row,) = report["rows"]
    assert row["bands"]["all"]["n"] == len(EVAL_PAIRS) and row["evaluated_now"] == 1
    merged = pq.read_table(out / "predictions.parquet")
    assert merged.num_rows == len(EVAL_PAIRS)
    assert len(set(merged.column("task_id").to_pylist())) == len(EVAL_PAIRS)


def test_band_model_recomputes_the_band_entropy(tiny, tmp_path):
    import torch

    from rptdata.models import load_causal_lm, load_tokenizer
    from rptdata.scorers import entropy_from_logits

    model, tasks = tiny
    report = run_eval(tiny_config(tiny, tmp_path / "rep", band_model=str(model)))
    assert report["band_entropy"] == {"source": "band_model", "model": str(model), "top_k": 16, "mode": "full-softmax"}
    cached = pq.read_table(tmp_path / "rep" / "band_entropy.parquet").to_pylist()
    tok = load_tokenizer(str(model))
    lm = load_causal_lm(str(model), dtype="float32", device="cpu")
    ctx, _ = EVAL_PAIRS[0]
    with torch.no_grad():
        logits = lm(torch.tensor([tok(ctx, add_special_tokens=False)["input_ids"]])).logits[0, -1]
    want = float(entropy_from_logits(logits, k=16))
    got = {r["task_id"]: r["entropy"] for r in cached}["eval-doc0@1"]
    assert got == pytest.approx(want, abs=1e-4)
    assert sum(report["band_counts"]["disjoint"].values()) == len(EVAL_PAIRS)


def test_cli_prints_the_table(tiny, tmp_path):
    model, tasks = tiny
    out = tmp_path / "rep"
    r = CliRunner().invoke(
        cli,
        [
            "eval",
            str(tasks),
            "--model",
            str(model),
            "--device",
            "cpu",
            "--out",
            str(out),
            "--no-progress",
            "--batch-size",
            "4",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "| model | mode | easy (H>0.5) | medium (H>1.0) | hard (H>1.5) | all | model entropy |" in r.output
    assert f"| {Path(model).name} | ntp |" in r.output
    assert "Nested bands: easy 5 ⊇ medium 4 ⊇ hard 2" in r.output
    assert (out / "report.md").exists() and (out / "report.json").exists()
    r = CliRunner().invoke(cli, ["eval", str(tasks), "--model", str(model), "--out", str(out), "--no-progress"])
    assert r.exit_code == 1 and "--resume" in r.output
    r = CliRunner().invoke(cli, ["eval", str(tasks), "--model", str(model), "--samples", "4", "--temperature", "0"])
    assert r.exit_code == 2 and "temperature > 0" in r.output


def test_cli_refuses_overlap_with_a_clear_message(tiny, tiny_run):
    _, tasks = tiny
    r = CliRunner().invoke(
        cli,
        [
            "eval",
            str(tasks),
            "--checkpoints",
            str(tiny_run),
            "--split",
            "train",
            "--limit",
            "2",
            "--device",
            "cpu",
            "--no-progress",
        ],
    )
    assert r.exit_code == 1
    assert "trained on 2 of the 2 evaluated documents" in r.output and "--allow-overlap" in r.output


def test_a_base_model_shared_by_runs_is_evaluated_once(tiny, tiny_run, tmp_path, forward_sizes):
    import shutil

    seen = forward_sizes
    other = tmp_path / "other" / "run"
    shutil.copytree(tiny_run, other)
    for step in ("step-000001", "step-000002"):
        shutil.rmtree(other / "checkpoints" / step)
    model, _ = tiny
    report = run_eval(
        tiny_config(tiny, tmp_path / "rep", models=(str(model),), checkpoints=(str(tiny_run), str(other)))
    )
    rows = report["rows"]
    assert [(r["run"], r["step"]) for r in rows] == [
        (None, None),
        ("tiny_train0/run", 0),
        ("tiny_train0/run", 1),
        ("tiny_train0/run", 2),
        ("tiny_train0/run", 3),
        ("other/run", 0),
        ("other/run", 3),
    ]
    # 7 subjects; the base model (the --model and both runs' step 0) runs once: 5 forward passes
    assert sum(seen) == 5 * len(EVAL_PAIRS)
    assert [r["evaluated_now"] for r in rows] == [6, 0, 6, 6, 6, 0, 6]
    for r in (rows[1], rows[5]):
        assert r["bands"] == rows[0]["bands"] and r["model_entropy"] == rows[0]["model_entropy"]
    assert rows[6]["bands"] == rows[4]["bands"]  # the same weights, in another folder, evaluated again
    stored = pq.read_table(tmp_path / "rep" / "predictions.parquet").to_pylist()
    assert len(stored) == 7 * len(EVAL_PAIRS)
    copied = {r["task_id"]: r["prediction"] for r in stored if r["model"] == rows[5]["model"]}
    assert copied == {r["task_id"]: r["prediction"] for r in stored if r["model"] == rows[0]["model"]}


# ---------------------------------------------------------------------------------------------
# paired differences


def test_paired_difference_hand_values():
    from rpttrain.eval import paired_difference

    d = paired_difference([1, 1, 0, 0, 1], [0, 1, 0, 1, 0])
    assert d["diff"] == pytest.approx(0.2) and (d["wins"], d["losses"]) == (2, 1)
    assert d["p_value"] == pytest.approx(1.0)  # 2 vs 1 discordant: exact two-sided binomial = 1
    sd = math.sqrt(sum((x - 0.2) ** 2 for x in [1, 0, 0, -1, 1]) / 4)
    assert d["ci_low"] == pytest.approx(0.2 - 1.96 * sd / math.sqrt(5))
    assert d["ci_high"] == pytest.approx(0.2 + 1.96 * sd / math.sqrt(5))
    # 12 tasks only A got right, none only B: p = 2 * 0.5**12
    d = paired_difference([1] * 12 + [0] * 8, [0] * 12 + [0] * 8)
    assert d["p_value"] == pytest.approx(2 * 0.5**12) and d["diff"] == pytest.approx(0.6)
    # sampled means are not 0/1: a paired z test
    d = paired_difference([0.5, 0.75, 0.25, 1.0], [0.25, 0.5, 0.25, 0.5])
    se = np.std([0.25, 0.25, 0.0, 0.5], ddof=1) / 2
    assert d["p_value"] == pytest.approx(math.erfc(0.25 / se / math.sqrt(2)))
    with pytest.raises(ValueError, match="same tasks"):
        paired_difference([1, 0], [1])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1), st.integers(0, 1)), min_size=2, max_size=60))
def test_paired_difference_is_antisymmetric_and_brackets_the_mean(pairs):
    from rpttrain.eval import paired_difference

    a, b = [p[0] for p in pairs], [p[1] for p in pairs]
    ab, ba = paired_difference(a, b), paired_difference(b, a)
    assert ab["diff"] == pytest.approx(np.mean(a) - np.mean(b))
    assert ab["diff"] == pytest.approx(-ba["diff"]) and ab["p_value"] == pytest.approx(ba["p_value"])
    assert (ab["wins"], ab["losses"]) == (ba["losses"], ba["wins"])
    assert ab["ci_low"] <= ab["diff"] <= ab["ci_high"]
    assert 0 <= ab["p_value"] <= 1
    if a == b:
        assert ab["diff"] == 0 and ab["p_value"] == 1.0


def test_report_pairs_the_base_and_each_runs_last_checkpoint(tiny, tiny_run, tmp_path):
    import shutil

    other = tmp_path / "other" / "run"
    shutil.copytree(tiny_run, other)
    shutil.rmtree(other / "checkpoints" / "step-000003")
    report = run_eval(tiny_config(tiny, tmp_path / "rep", models=(), checkpoints=(str(tiny_run), str(other))))
    pairs = [(r["a"], r["b"]) for r in report["paired"]]
    run_a, run_b = "tiny_train0/run", "other/run"
    assert pairs == [(f"{run_a}@3", f"{run_a}@0"), (f"{run_b}@2", f"{run_a}@0"), (f"{run_b}@2", f"{run_a}@3")]
    rows = {r["model"]: r for r in report["rows"]}
    for p in report["paired"]:
        for band in ("easy", "medium", "hard", "all"):
            d = p["bands"][band]
            want = rows[p["a"]]["bands"][band]["accuracy"] - rows[p["b"]]["bands"][band]["accuracy"]
            assert d["n"] == rows[p["a"]]["bands"][band]["n"]
            assert d["diff"] == pytest.approx(want)
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "## Paired differences" in md and f"| {run_a}@3 − {run_a}@0 | ntp |" in md


def test_max_compute_leaves_out_later_checkpoints(tiny, tiny_run, tmp_path):
    from rpttrain.checkpoint import list_checkpoints

    flops = [json.loads((c / "state.json").read_text())["totals"]["flops"] for c in list_checkpoints(tiny_run)]
    budget = (flops[1] + flops[2]) / 2
    result = CliRunner().invoke(
        cli,
        [
            "eval",
            str(tiny[1]),
            "--checkpoints",
            str(tiny_run),
            "--max-compute",
            str(budget),
            "--out",
            str(tmp_path / "rep"),
            "--device",
            "cpu",
            "--no-progress",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert [r["step"] for r in report["rows"]] == [0, 1, 2]
    assert max(r["compute"] for r in report["rows"]) == flops[1] <= budget
    assert [(p["a"], p["b"]) for p in report["paired"]] == [("run@2", "run@0")]
    assert "Paired differences" in result.output and "| run@2 − run@0 | ntp |" in result.output
    bad = CliRunner().invoke(cli, ["eval", str(tiny[1]), "--checkpoints", str(tiny_run), "--max-compute", "-1"])
    assert bad.exit_code != 0 and "--max-compute must be a positive number" in bad.output
