"""`rpt answer-tasks`: problems with a checkable answer -> answer tasks, through the CLI as users run it,
on the shared corpora (GSM8K, Omni-MATH) and builtin:champ; bad records; the overlap guard."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from cli.main import cli
from rptdata.overlap import NgramIndex, words
from rptdata.tasks.taskdef import split_of
from rpttrain.data import load_tasks, task_kind

SHARED = Path(__file__).resolve().parents[2] / "shared" / "corpora"
GSM8K = SHARED / "gsm8k-train.jsonl"
OMNI = SHARED / "omnimath-rule.jsonl"
needs_shared = pytest.mark.skipif(not GSM8K.exists(), reason="../shared/corpora is not here")


def run(*args: str) -> str:
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


@needs_shared
def test_gsm8k(tmp_path):
    out = tmp_path / "gsm8k"
    printed = run(
        "answer-tasks", GSM8K, "--question-field", "question", "--answer-from", "gsm8k", "--max-problems", "200",
        "--eval-fraction", "0.25", "--seed", "3", "--out", out, "--no-progress",
    )  # fmt: skip
    m = manifest(out)
    assert m["stage"] == "answer-tasks" and task_kind(m) == "answer"
    c = m["counts"]
    assert (
        c["records_read"]
        == 200
        == c["tasks"]["train"] + c["tasks"]["eval"] + sum(c["rejected"].values()) + sum(c["dropped"].values())
    )
    assert "200 records" in printed
    train, held_out = load_tasks(out, "train"), load_tasks(out, "eval")
    assert len(train) == c["tasks"]["train"] and len(held_out) == c["tasks"]["eval"] > 0
    first = json.loads(GSM8K.read_text().splitlines()[0])
    row = next(t for t in train + held_out if t["doc_id"].endswith("#1"))
    assert row["question"] == row["context"] == first["question"]
    assert row["answer"] == row["continuation"] == "72" == first["answer"].split("#### ")[-1]
    assert row["boundaries"] == []
    # the split is by problem, with the recorded rule
    assert all(split_of(t["doc_id"], 3, 0.25) == "eval" for t in held_out)
    assert all(split_of(t["doc_id"], 3, 0.25) == "train" for t in train)
    # the same command again keeps the finished output
    run("answer-tasks", GSM8K, "--question-field", "question", "--answer-from", "gsm8k", "--max-problems", "200",
        "--eval-fraction", "0.25", "--seed", "3", "--out", out, "--no-progress")  # fmt: skip
    assert manifest(out)["fingerprint"] == m["fingerprint"]


@needs_shared
def test_omnimath_answer_field(tmp_path):
    out = tmp_path / "omni"
    run("answer-tasks", OMNI, "--max-problems", "60", "--out", out, "--no-progress")
    rows = {t["doc_id"]: t for t in load_tasks(out, "train") + load_tasks(out, "eval")}
    first = json.loads(OMNI.read_text().splitlines()[0])
    assert rows[f"{OMNI}#1"]["answer"] == first["answer"].strip()
    assert rows[f"{OMNI}#1"]["question"] == first["problem"]


def test_champ(tmp_path):
    out = tmp_path / "champ"
    run("answer-tasks", "builtin:champ", "--out", out, "--no-progress")
    c = manifest(out)["counts"]
    assert c["records_read"] == 270 and c["tasks"]["train"] + c["tasks"]["eval"] > 250
    task = load_tasks(out, "train", limit=1)[0]
    assert task["question"] and task["answer"] and task["doc_id"].startswith("builtin:champ#")


def test_bad_records_are_named_or_counted(tmp_path, write_jsonl):
    rows = [
        {"problem": "What is 6 times 12?", "solution": "6*12 = 72, so \\boxed{72}."},
        {"problem": "What is 2+2?", "solution": "no box here"},  # line 2: no answer
        {"problem": "Name the colour of the sky.", "nothing": 1},  # line 3: no answer field
        {"problem": "What is 1/2 of 1?", "solution": "\\boxed{\\frac{1}{2}}"},
        {"problem": "What is 6 times 12?", "solution": "\\boxed{72}"},  # line 5: the same question again
    ]
    corpus = write_jsonl("problems.jsonl", rows, raw_lines=[b"{not json"])
    result = CliRunner().invoke(
        cli,
        [
            "answer-tasks",
            str(corpus),
            "--answer-field",
            "solution",
            "--answer-from",
            "boxed",
            "--out",
            str(tmp_path / "a"),
        ],
    )
    assert result.exit_code == 1
    assert f"{corpus}, line 2" in result.output and "no final answer" in result.output
    out = tmp_path / "b"
    run("answer-tasks", corpus, "--answer-field", "solution", "--answer-from", "boxed", "--skip-bad", "--out", out,
        "--no-progress", "--eval-fraction", "0")  # fmt: skip
    c = manifest(out)["counts"]
    assert c["rejected"]["no_answer"] == 1 and c["rejected"]["missing_answer"] == 1
    assert c["rejected"]["malformed_json"] == 1 and c["dropped"]["duplicate_question"] == 1
    assert c["tasks"]["train"] == 2 and c["records_read"] == 6
    assert sorted(t["answer"] for t in load_tasks(out, "train")) == ["72", "\\frac{1}{2}"]
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert {r["reason"] for r in rejects} == {"no_answer", "missing_answer", "malformed_json"}
    assert any(r["where"] == f"{corpus}, line 3" for r in rejects)


def test_an_answer_math_verify_cannot_read(tmp_path, write_jsonl):
    corpus = write_jsonl("p.jsonl", [{"problem": "Say something.", "answer": "\\text{}"}])
    result = CliRunner().invoke(cli, ["answer-tasks", str(corpus), "--out", str(tmp_path / "a")])
    assert (
        result.exit_code == 1 and f"{corpus}, line 1" in result.output and "math-verify reads nothing" in result.output
    )


def test_overlap_guard_drops_planted_problems(tmp_path, write_jsonl):
    """Eval problems whose text sits in a prepared corpus are dropped and counted; the others stay."""
    problems = [
        {"problem": f"Problem {i}: a farmer has {i} apples and buys {i + 3} more baskets of {i * 2} apples each, "
         f"then gives away {i} apples to every neighbour on the street. How many apples remain?", "answer": str(i)}
        for i in range(40)
    ]  # fmt: skip
    corpus = write_jsonl("problems.jsonl", problems)
    held_out = [i for i in range(40) if split_of(f"{corpus}#{i + 1}", 0, 0.5) == "eval"]
    planted = held_out[:3]
    # the prepared corpus: unrelated text, plus the planted problems' text with other spacing and case
    docs = [{"text": "An unrelated document about trains and rivers, nothing else. " * 3}] + [
        {"text": "Seen before: " + problems[i]["problem"].upper().replace(" ", "  ") + " The end."} for i in planted
    ]
    prep = tmp_path / "prep"
    run("prepare", write_jsonl("docs.jsonl", docs), "--out", prep, "--no-progress")
    out = tmp_path / "answers"
    run("answer-tasks", corpus, "--eval-fraction", "0.5", "--exclude-overlap", prep, "--out", out, "--no-progress")
    m = manifest(out)
    assert m["counts"]["dropped"]["overlap"] == 3
    assert m["overlap"]["corpora"][str(prep)] == {"documents_scanned": 4, "problems_dropped": 3}
    kept = {t["doc_id"] for t in load_tasks(out, "eval")}
    assert kept == {f"{corpus}#{i + 1}" for i in held_out if i not in planted}
    assert m["counts"]["tasks"]["eval"] == len(held_out) - 3
    assert pq.read_table(out / "train").num_rows == 40 - len(held_out)


def test_ngram_index_rule():
    index = NgramIndex(["one two three four five six seven eight nine ten eleven twelve thirteen fourteen", "a b c"])
    index.scan(["zero one two three four five six seven eight nine ten eleven twelve", "x a b"])
    assert index.hits.tolist() == [False, False]  # 12 words in a row, and "a b" without "c"
    index.scan(["... Two, three; four five six seven eight nine ten eleven twelve thirteen fourteen!"])
    assert index.hits.tolist() == [True, False]
    index.scan(["the end of one document a b", "c starts the next"])  # no window across documents
    assert index.hits.tolist() == [True, False]
    index.scan(["so A B C"])
    assert index.hits.tolist() == [True, True]
    assert words("Déjà-vu, $x^2$!") == ["déjà", "vu", "x", "2"]
