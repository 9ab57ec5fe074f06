"""The judge reward (`--reward judge --judge MODEL`, rpttrain/judge.py): the verdict parser and the
word-prefix shortcut as properties; the judge with a real model (the embedded smollm2-135m): batched,
each distinct pair judged once, cached across calls and processes, FLOPs counted; an unparseable
judge (a tiny random Llama) scores 0 and is counted; train, eval and probe through the CLI on
sentence tasks of a real corpus, eval paying nothing for what the cache holds; refusals.

Run: .venv/bin/python -m pytest -q tests/test_judge.py
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from cli.main import cli
from rptdata.errors import BadOption
from rpttrain.judge import Judge, judge_messages, parse_verdict, prefix_at_word
from tests.conftest import OMNIMATH

WORD = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABC0123456789", min_size=1, max_size=8)
FREE = st.text(alphabet=st.characters(blacklist_characters="{}\\", blacklist_categories=("Cs",)), max_size=40)


@given(FREE, st.sampled_from(["Score: 1", "score:1", "**Score:** 1", "SCORE = 1"]), FREE)
def test_the_last_score_line_decides(before, line, after):
    if "score" not in (before + after).lower() and "\\boxed" not in after:
        assert parse_verdict(before + "\n" + line + "\n" + after) == 1.0
        assert parse_verdict(before + "\n" + line + "\nScore: 0") == 0.0  # the last one


@given(FREE, st.sampled_from(["yes", "Yes", " YES ", "true", "1"]))
def test_a_boxed_yes_after_any_text_is_yes(before, word):
    if "score" not in before.lower():
        assert parse_verdict(before + "\\boxed{" + word + "}") == 1.0
        assert parse_verdict(before + "\\boxed{" + word + "} then \\boxed{no}") == 0.0  # the last box decides


@given(FREE, WORD)
def test_a_box_of_another_word_is_unparseable(before, word):
    if word.lower() not in {"yes", "no", "true", "false", "1", "0"} and "score" not in before.lower():
        assert parse_verdict(before + "\\boxed{" + word + "}") is None


@given(st.lists(WORD, min_size=1, max_size=12), st.data())
def test_word_prefixes_pass_and_cut_words_fail(words, data):
    reference = " ".join(words) + "."
    k = data.draw(st.integers(1, len(words)))
    assert prefix_at_word("  ".join(words[:k]), reference)  # whitespace is folded
    cut = words[k - 1]
    if len(cut) > 1:
        assert not prefix_at_word(" ".join(words[: k - 1] + [cut[:-1]]), reference)
    assert not prefix_at_word(reference + " more", reference)


def test_the_prompt_shows_reference_and_prediction_and_asks_for_a_score():
    (m,) = judge_messages(" The sum is 4.", "It is 4")
    user = m["content"]
    assert "Reference: The sum is 4.\n" in user and "Prediction: It is 4\n" in user
    assert user.endswith("Score: 1\nor\nScore: 0")


TASKS = [
    {"task_id": "a@1", "context": "We add two and two.", "continuation": " The sum is four.", "boundaries": []},
    {"task_id": "b@1", "context": "The cat sat.", "continuation": " It was on the mat.", "boundaries": []},
]


@pytest.fixture(scope="module")
def smol_judge(tmp_path_factory):
    cache = tmp_path_factory.mktemp("judge") / "verdicts.sqlite"
    judge = Judge.load("smollm2-135m", device="cpu", dtype="float32", cache_path=cache, max_new_tokens=6)
    yield judge
    judge.close()


def test_a_real_judge_runs_each_distinct_pair_once_and_caches_it(smol_judge, tmp_path):
    a, b = TASKS
    items = [
        (a, " The total is four."),
        (a, "The total  is four."),  # the same after normalization: one call
        (a, None),
        (a, " The sum"),  # a word prefix of the reference: 1 without a call
        (b, " It was on the sofa."),
        (b, " It was on the sofa."),
    ]
    verdicts = smol_judge.judge(items)
    counts = smol_judge.take_counts()
    assert [v.status for v in verdicts[2:4]] == ["no_prediction", "exact"]
    assert [v.reward for v in verdicts[2:4]] == [0.0, 1.0]
    assert counts["judge_calls"] == 2 and counts["judge_cache_hits"] == 2
    assert counts["judge_tokens"] > 0 and counts["judge_flops"] == 2.0 * smol_judge.n_params * counts["judge_tokens"]
    for v in verdicts[:2] + verdicts[4:]:  # what the model wrote decides, as parse_verdict reads it
        parsed = parse_verdict(v.output)
        assert (v.status, v.reward) == (("unparseable", 0.0) if parsed is None else ("yes" if parsed else "no", parsed))
    assert verdicts[0] == verdicts[1] and verdicts[4] == verdicts[5]
    assert counts["judge_unparseable"] == sum(v.status == "unparseable" for v in verdicts)
    # the same pairs again, in another order: no call, the same verdicts
    again = smol_judge.judge(items[::-1])
    counts2 = smol_judge.take_counts()
    assert counts2["judge_calls"] == 0 and counts2["judge_cache_hits"] == 4
    # the compute counted is what judging these pairs costs, whether the cache held them or not
    assert counts2["judge_tokens"] == counts["judge_tokens"] and counts2["judge_flops"] == counts["judge_flops"]
    assert again[::-1] == verdicts
    rows = sqlite3.connect(smol_judge.cache.path).execute("SELECT count(*) FROM verdicts").fetchone()[0]
    assert rows == 2  # the shortcut cases are not stored


def test_an_unparseable_judge_scores_zero_and_is_counted(tmp_path, smollm2_tokenizer):
    """A tiny random Llama as the judge writes token soup: every verdict it gives is unparseable."""
    from tests.rpt_fixtures import tiny_llama

    smollm2_tokenizer.save_pretrained(tmp_path / "tok")
    model = tiny_llama(tmp_path / "model", tmp_path / "tok")
    judge = Judge.load(str(model), device="cpu", dtype="float32", cache_path=tmp_path / "c.sqlite", max_new_tokens=4)
    try:
        items = [(TASKS[0], " The total is four."), (TASKS[1], " A dog.")]
        verdicts = judge.judge(items)
        counts = judge.take_counts()
        assert all(parse_verdict(v.output) is None for v in verdicts)
        assert [(v.status, v.reward) for v in verdicts] == [("unparseable", 0.0)] * 2
        assert counts["judge_unparseable"] == 2 and counts["judge_calls"] == 2
        again = judge.judge(items)  # cached as unparseable (greedy decoding would write it again), counted again
        counts = judge.take_counts()
        assert again == verdicts and counts["judge_calls"] == 0 and counts["judge_unparseable"] == 2
    finally:
        judge.close()


# ---------------------------------------------------------------------------------------------
# through the CLI: sentence tasks of the Omni-MATH stand-in, the embedded model as policy and judge


def run(*args) -> str:
    r = CliRunner().invoke(cli, [str(a) for a in args])
    assert r.exit_code == 0, r.output + repr(r.exception)
    return r.output


@pytest.fixture(scope="module")
def sentence_tasks(tmp_path_factory, smollm2_tokenizer) -> Path:
    from tests.rpt_fixtures import tiny_llama

    root = tmp_path_factory.mktemp("judge-tasks")
    smollm2_tokenizer.save_pretrained(root / "tok")
    scorer = tiny_llama(root / "model", root / "tok")
    corpus = root / "omni.jsonl"
    with open(OMNIMATH, encoding="utf-8") as f:
        corpus.write_text("".join(next(f) for _ in range(6)), encoding="utf-8")
    run("prepare", corpus, "--template", "{problem}\\n\\n{solution}", "--out", root / "prep", "--tokenizer",
        "smollm2-135m", "--no-progress")  # fmt: skip
    run("score-entropy", root / "prep", "--out", root / "scored", "--model", scorer, "--keep-all", "--max-context", 128,
        "--engine", "hf", "--dtype", "float32", "--device", "cpu", "--no-progress")  # fmt: skip
    run("make-tasks", root / "scored", "--out", root / "tasks", "--unit", "sentence", "--threshold", 0,
        "--context-tokens", 32, "--eval-fraction", 0.5, "--max-tasks", 4, "--max-eval-tasks", 3, "--no-progress")  # fmt: skip
    return root / "tasks"


JUDGE = ["--reward", "judge", "--judge", "smollm2-135m", "--judge-max-new-tokens", 6]


def test_train_eval_and_probe_with_the_judge(sentence_tasks, tmp_path):
    cache = tmp_path / "verdicts.sqlite"
    runs = tmp_path / "run"
    # the raw `continuation` format: every completion is a prediction, so the judge is asked (this
    # model boxes nothing under the `sentence` format within a few tokens)
    run("train", sentence_tasks, "--out", runs, "--model", "smollm2-135m", "--steps", 1, "--batch-size", 2,
        "--group-size", 2, "--max-new-tokens", 8, "--max-prompt-tokens", 256, "--prompt-template", "continuation",
        *JUDGE, "--judge-cache", cache, "--device", "cpu", "--dynamic-sampling-from", -1, "--save-every", 1,
        "--sample-every", 1, "--no-progress")  # fmt: skip
    (m,) = [json.loads(x) for x in (runs / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((runs / "summary.json").read_text())
    n = summary["totals"]
    # every one of the 4 predictions is judged, from the model, the cache or the shortcuts
    samples = [json.loads(x) for x in (runs / "samples.jsonl").read_text().splitlines()]
    statuses = [s["status"] for s in samples]
    assert len(samples) == 4 and set(statuses) <= {"yes", "no", "unparseable", "exact", "no_prediction"}
    assert m["judge_calls"] + m["judge_cache_hits"] == sum(s not in ("exact", "no_prediction") for s in statuses) > 0
    assert m["judge_unparseable"] == statuses.count("unparseable")
    assert all(s["reward"] == (1.0 if s["status"] in ("yes", "exact") else 0.0) for s in samples)
    # the judge's FLOPs (its own N) are in the step's FLOPs, beside the policy's 6N / 2N
    from rptdata.models import load_causal_lm

    n_params = sum(p.numel() for p in load_causal_lm("smollm2-135m", dtype="float32", device="cpu").parameters())
    policy = 6.0 * n_params * m["update_tokens"] + 2.0 * n_params * m["rollout_forward_tokens"]
    assert m["judge_flops"] == 2.0 * n_params * m["judge_tokens"] and m["flops"] == pytest.approx(
        policy + m["judge_flops"]
    )
    assert n["judge_calls"] == m["judge_calls"] and n["flops"] == m["flops"]

    # eval: the base model (step 0) and the checkpoint, twice; the second pays nothing
    for out in ("e1", "e2"):
        run("eval", sentence_tasks, "--checkpoints", runs, "--mode", "reasoning", "--prompt-template", "continuation",
            *JUDGE, "--judge-cache", cache,
            "--limit", 2, "--max-new-tokens", 8, "--max-prompt-tokens", 256, "--device", "cpu", "--out",
            tmp_path / out, "--no-progress")  # fmt: skip
    first, second = (json.loads((tmp_path / o / "report.json").read_text())["judge"] for o in ("e1", "e2"))
    assert first["model"] == "smollm2-135m" and first["judge_calls"] > 0 and second["judge_calls"] == 0
    assert second["judge_tokens"] == first["judge_tokens"] > 0
    assert second["judge_cache_hits"] == first["judge_calls"] + first["judge_cache_hits"]
    assert second["judge_unparseable"] == first["judge_unparseable"]

    out = run("probe", sentence_tasks, "--prompt-template", "continuation", "--tasks", 2, "--samples", 2,
              "--max-new-tokens", 8, *JUDGE, "--judge-cache", cache, "--device", "cpu", "--out", tmp_path / "p.json")  # fmt: skip
    (first,) = json.loads((tmp_path / "p.json").read_text())
    run("probe", sentence_tasks, "--prompt-template", "continuation", "--tasks", 2, "--samples", 2,
        "--max-new-tokens", 8, *JUDGE, "--judge-cache", cache, "--device", "cpu", "--out", tmp_path / "p2.json")  # fmt: skip
    (second,) = json.loads((tmp_path / "p2.json").read_text())
    assert (
        "continuation" in out and second["random_at_1"] == first["random_at_1"] and second["judge"]["judge_calls"] == 0
    )
    assert second["judge"]["judge_cache_hits"] == first["judge"]["judge_calls"] + first["judge"]["judge_cache_hits"]


def test_the_judge_is_refused_where_it_cannot_run(sentence_tasks, tmp_path):
    def fails(*args) -> str:
        r = CliRunner().invoke(cli, [str(a) for a in args])
        assert r.exit_code != 0
        return r.output

    base = ["train", sentence_tasks, "--out", tmp_path / "r", "--prompt-template", "sentence"]
    assert "--reward judge needs --judge MODEL" in fails(*base, "--reward", "judge")
    assert "is read by --reward judge only" in fails(*base, "--reward", "exact", "--judge", "smollm2-135m")
    out = fails(*base, *JUDGE, "--backend", "trl")
    assert "--backend trl cannot honour --reward judge" in out
    out = fails(*base, *JUDGE, "--backend", "verl")
    assert "--backend verl cannot honour --reward judge" in out
    out = fails("eval", sentence_tasks, "--model", "smollm2-135m", *JUDGE, "--mode", "ntp")
    assert "evaluate with --mode reasoning" in out
    with pytest.raises(BadOption, match="judge model"):
        from rpttrain.dense import GroupScorer
        from rpttrain.prompts import load_prompt_format

        GroupScorer("judge", load_prompt_format("sentence"), None)
