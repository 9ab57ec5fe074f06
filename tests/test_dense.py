"""App. A's dense rewards in the loop (rpttrain/dense.py) and the collapse monitor in `rpt train`
and `rpt eval`, on a tiny random Llama (real forward passes, no mocks), plus the backends' refusal.

Run: .venv/bin/python -m pytest -q tests/test_dense.py
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from rptdata.models import load_causal_lm, load_tokenizer
from rpttrain.backends import BackendOptionError, check_backend
from rpttrain.collapse import COLLAPSE_KEYS, collapse_metrics
from rpttrain.config import TrainConfig
from rpttrain.data import load_tasks
from rpttrain.dense import GroupScorer
from rpttrain.prompts import build_prompt_ids, load_prompt_format
from rpttrain.rollout import Sampling, make_engine
from tests.rpt_fixtures import tiny_llama, tiny_train_config, write_tasks_dir

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
EVAL_PAIRS = [("The brown", " fox"), ("a lazy", " dog"), ("1234", "5"), ("fox jumps", " over")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_bpe_dir):
    root = tmp_path_factory.mktemp("dense")
    model = tiny_llama(root / "model", tiny_bpe_dir)
    tasks = write_tasks_dir(
        root / "tasks", str(tiny_bpe_dir), PAIRS, eval_pairs=EVAL_PAIRS, entropies=[0.3, 0.8, 1.2, 2.0]
    )
    return model, tasks


def _probs(model, tok, context: str) -> torch.Tensor:
    """P(. | x<t) of the raw context, from a plain forward (the independent reference)."""
    ids = tok(context, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        return torch.softmax(model(torch.tensor([ids])).logits[0, -1].float(), -1)


def test_group_scorer_dense_matches_an_independent_forward(tiny):
    model_dir, tasks_dir = tiny
    tok, model = load_tokenizer(str(model_dir)), load_causal_lm(str(model_dir), dtype="float32", device="cpu")
    tasks = load_tasks(tasks_dir, "train")
    fmt = load_prompt_format("continuation")
    prompts = [build_prompt_ids(fmt, t["context"], tok, 64) for t in tasks]
    groups = make_engine("hf", model, tok).generate(prompts, Sampling(n=6, temperature=1.5, max_new_tokens=1, seed=1))
    scorer = GroupScorer("dense", fmt, tok, model, max_prompt_tokens=64)
    scored = scorer.score(tasks, groups)
    assert scorer.forward_tokens == sum(len(p) for p in prompts)  # one forward per group, not per rollout
    some_right = some_wrong = False
    for task, group, sg in zip(tasks, groups, scored):
        p = _probs(model, tok, task["context"])
        for comp, r, ok in zip(group, sg.rewards, sg.correct):
            y0 = comp.token_ids[0]
            assert ok == (y0 == task["target_id"])
            assert r == (1.0 if ok else pytest.approx(float(p[y0]), rel=1e-4))
            some_right |= ok
            some_wrong |= not ok
    assert some_wrong
    # the fused step hands over the prompts' logits: the same rewards, no forward
    with torch.no_grad():
        logits = torch.stack([model(torch.tensor([p])).logits[0, -1] for p in prompts])
    reuse = GroupScorer("dense", fmt, tok, model, max_prompt_tokens=64)
    again = reuse.score(tasks, groups, last_logits=logits)
    assert reuse.forward_tokens == 0
    assert [r for g in again for r in g.rewards] == pytest.approx([r for g in scored for r in g.rewards], rel=1e-5)
    # conditional dense: a group with no right rollout scores 0 throughout
    cond = GroupScorer("conditional-dense", fmt, tok, model, max_prompt_tokens=64).score(tasks, groups)
    for sg, c in zip(scored, cond):
        assert c.rewards == (sg.rewards if any(sg.correct) else [0.0] * len(sg.rewards))


def test_boxed_formats_take_y0_from_the_extracted_text(tiny):
    model_dir, tasks_dir = tiny
    tok, model = load_tokenizer(str(model_dir)), load_causal_lm(str(model_dir), dtype="float32", device="cpu")
    task = load_tasks(tasks_dir, "train")[0]  # context "The quick brown", continuation " fox"

    class C:  # a completion as the engines return it
        def __init__(self, text):
            self.text, self.token_ids = text, [1, 2]

    sg = GroupScorer("dense", load_prompt_format("v0"), tok, model, 64).score(
        [task], [[C("so \\boxed{ fox}"), C("\\boxed{ lazy}"), C("no box")]]
    )[0]
    fox, lazy = (
        tok(" fox", add_special_tokens=False)["input_ids"][0],
        tok(" lazy", add_special_tokens=False)["input_ids"][0],
    )
    assert sg.first_ids == [fox, lazy, None] and sg.correct == [True, False, False]
    assert sg.rewards == [1.0, pytest.approx(float(_probs(model, tok, task["context"])[lazy]), rel=1e-4), 0.0]


@pytest.mark.parametrize("fused", [True, False])
def test_train_logs_dense_rewards_and_the_collapse_monitor(tiny, tmp_path, fused):
    from rpttrain.train import run_train

    model, tasks = tiny
    out = tmp_path / "run"
    run_train(
        tiny_train_config(
            tasks,
            model,
            out,
            steps=2,
            batch_size=4,
            group_size=4,
            temperature=1.5,
            reward="dense",
            lr=1e-2,
            save_every=2,
            fused_one_token=fused,
            seed=1,
        )
    )
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    for m in metrics:
        assert set(COLLAPSE_KEYS) <= set(m)
        assert 1.0 <= m["distinct_predictions_mean"] <= 4 and 0.25 <= m["majority_share_mean"] <= 1
        assert 0 <= m["wrong_consensus_share"] <= 1
        assert m["reward_mean"] >= m["accuracy"]  # wrong rollouts earn their probability
        # fused: the probabilities come from the step's own forward; two-pass: one more forward of the prompts
        prompts = m["update_tokens"]
        assert m["rollout_forward_tokens"] == (0 if fused else 2 * prompts)
    from rpttrain.plot import plot_run

    assert plot_run(out).stat().st_size > 1000


def test_eval_reports_dense_rewards_and_collapse_per_band(tiny, tmp_path):
    from rpttrain.eval import EvalConfig, run_eval
    from rpttrain.eval.markdown import format_report_md

    model_dir, tasks = tiny
    report = run_eval(
        EvalConfig(
            tasks_dir=str(tasks),
            models=(str(model_dir),),
            out=str(tmp_path / "rep"),
            device="cpu",
            mode="both",
            prompt_template="continuation",
            samples=6,
            temperature=1.5,
            reward="dense",
            batch_size=4,
            progress=False,
        )
    )
    ntp, reasoning = report["rows"]
    rows = pq.read_table(tmp_path / "rep" / "predictions.parquet").to_pylist()
    tok, model = load_tokenizer(str(model_dir)), load_causal_lm(str(model_dir), dtype="float32", device="cpu")
    tasks_by_id = {t["task_id"]: t for t in load_tasks(tasks, "eval")}
    for r in rows:
        t = tasks_by_id[r["task_id"]]
        p = _probs(model, tok, t["context"])
        # y[0] is the token the model produced (ntp: the argmax), which re-tokenizing its text need not give back
        ids = (
            [int(p.argmax())]
            if r["mode"] == "ntp"
            else [i for i in range(len(p)) if tok.decode([i]) == r["prediction"]]
        )
        expected = [1.0 if i == t["target_id"] else float(p[i]) for i in ids]
        assert any(r["reward"] == pytest.approx(e, rel=1e-4) for e in expected), (r, expected)
    assert ntp.get("collapse") is None and set(reasoning["collapse"]) == {"easy", "medium", "hard", "all"}
    groups = {}
    for r in rows:
        if r["mode"] == "reasoning":
            groups.setdefault(r["task_id"], []).append(r)
    want = collapse_metrics([([r["prediction"] for r in g], [r["reward"] >= 1.0 for r in g]) for g in groups.values()])
    got = reasoning["collapse"]["all"]
    assert got["tasks"] == len(EVAL_PAIRS) and got["length_mean"] == 1.0
    assert {k: got[k] for k in COLLAPSE_KEYS} == pytest.approx(want)
    assert "## Collapse monitor and response length" in format_report_md(report)


def test_backends_refuse_the_dense_rewards_by_name(tiny, tmp_path):
    for backend in ("trl", "verl"):
        with pytest.raises(BackendOptionError, match=f"--backend {backend} cannot honour --reward dense"):
            check_backend(TrainConfig("t", "o", reward="dense"), backend)
    check_backend(TrainConfig("t", "o", reward="first-token"), "trl")
    model, tasks = tiny
    rpt = Path(sys.executable).parent / "rpt"
    r = subprocess.run(
        [
            str(rpt),
            "train",
            str(tasks),
            "--out",
            str(tmp_path / "v"),
            "--model",
            str(model),
            "--backend",
            "verl",
            "--reward",
            "conditional-dense",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode != 0 and "cannot honour --reward conditional-dense" in r.stderr + r.stdout
    assert "Traceback" not in r.stderr


def test_probe_scores_with_the_dense_reward(tiny):
    from rpttrain.probe import ProbeConfig, run_probe

    model, tasks = tiny
    common = dict(
        tasks_dir=str(tasks),
        model=str(model),
        templates=("continuation",),
        samples=6,
        tasks=8,
        temperature=1.5,
        device="cpu",
        max_prompt_tokens=32,
    )
    (dense,) = run_probe(ProbeConfig(reward="dense", **common))
    (prefix,) = run_probe(ProbeConfig(reward="prefix", **common))
    # the same samples (seeded): the same right share; dense adds the wrong ones' probabilities
    assert dense["random_at_1"] == prefix["random_at_1"] == prefix["reward_mean"]
    assert dense["reward_mean"] > dense["random_at_1"]
    assert dense["signal"] >= prefix["signal"]
