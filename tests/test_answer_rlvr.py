"""RLVR on answer tasks as users run it: `rpt train --reward math` (the in-house and the TRL backend),
a run started from another run's checkpoint, an exact resume, and `rpt eval --mode answer` with its
figures recounted from predictions.parquet and against a hand count."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from safetensors.torch import load_file

from cli.main import cli
from rpttrain.eval.report import _answer_row
from rpttrain.eval.store import PREDICTIONS_SCHEMA
from tests.rpt_fixtures import tiny_llama

RPT = str(Path(sys.executable).with_name("rpt"))
PROBLEMS = [
    {"problem": f"Tom has {a} apples and buys {b} more. How many apples does Tom have now?", "answer": str(a + b)}
    for a, b in [(2, 3), (4, 4), (10, 5), (7, 1), (6, 6), (3, 9), (8, 2), (5, 5), (1, 1), (9, 4), (12, 3), (2, 2)]
]
RLVR = [
    "--prompt-template", "answer", "--reward", "math", "--max-new-tokens", "12", "--batch-size", "2",
    "--group-size", "2", "--max-prompt-tokens", "128", "--dynamic-sampling-from", "-1", "--lr", "1e-4",
    "--no-progress", "--report-to", "none", "--device", "cpu",
]  # fmt: skip


def rpt(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    done = subprocess.run([RPT, *map(str, args)], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def answers(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("answers")
    (root / "problems.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS))
    out = root / "tasks"
    cwd = os.getcwd()
    os.chdir(root)  # a relative input: the problems' ids, so the split, are the same in every run
    try:
        result = CliRunner().invoke(
            cli,
            [
                "answer-tasks",
                "problems.jsonl",
                "--eval-fraction",
                "0.4",
                "--seed",
                "1",
                "--out",
                str(out),
                "--no-progress",
            ],
        )
    finally:
        os.chdir(cwd)
    assert result.exit_code == 0, result.output
    return out


def test_refusals(answers, tmp_path):
    """A next-token reward, format or objective on answer tasks is refused by name, before any load."""
    for extra, message in [
        (["--reward", "prefix", "--prompt-template", "answer"], "--reward prefix cannot score answer tasks"),
        (["--reward", "math"], "--prompt-template v0 does not fit answer tasks"),
        (["--objective", "ntp"], "--objective ntp trains next-token prediction"),
    ]:
        result = CliRunner().invoke(cli, ["train", str(answers), "--out", str(tmp_path / "r"), *extra])
        assert result.exit_code == 2 and message in result.output, result.output
    result = CliRunner().invoke(cli, ["eval", str(answers), "--mode", "ntp", "--out", str(tmp_path / "e")])
    assert result.exit_code == 2 and "--reward prefix cannot score answer tasks" in result.output


@pytest.mark.slow
def test_rlvr_from_a_checkpoint_then_eval_before_and_after(answers, tmp_path):
    """The Table-2 pipeline on the embedded model: RLVR from the base model, RLVR from that run's
    checkpoint (recorded as its start), then `rpt eval --mode answer` of both."""
    first, second = tmp_path / "first", tmp_path / "second"
    done = rpt("train", answers, "--model", "smollm2-135m", "--out", first, "--steps", "1", *RLVR)
    assert "train: 1 steps" in done.stdout
    (metrics,) = [json.loads(line) for line in (first / "metrics.jsonl").read_text().splitlines()]
    assert metrics["verify_timeouts"] == 0 and metrics["verify_errors"] == 0
    assert metrics["completion_len_mean"] > 1 and 0.0 <= metrics["reward_mean"] <= 1.0
    start = first / "checkpoints" / "step-000001"
    rpt("train", answers, "--model", start, "--out", second, "--steps", "1", *RLVR)
    origin = json.loads((second / "trained_on.json").read_text())["started_from"]
    assert origin["checkpoint"] == str(start.resolve()) and origin["step"] == 1 and origin["objective"] == "rpt"
    assert origin["flops"] == json.loads((start / "state.json").read_text())["totals"]["flops"]

    report_dir = tmp_path / "report"
    done = rpt(
        "eval", answers, "--checkpoints", first, "--checkpoints", second, "--mode", "answer", "--samples", "2",
        "--temperature", "0.8", "--max-new-tokens", "12", "--limit", "3", "--out", report_dir, "--no-progress",
    )  # fmt: skip
    assert "pass@1" in done.stdout and "Before and after RLVR" in done.stdout
    report = json.loads((report_dir / "report.json").read_text())
    rows = {r["model"]: r for r in report["rows"]}
    assert set(rows) == {"first@0", "first@1", "second@0", "second@1"}
    assert rows["second@0"]["started_from"]["step"] == 1 and rows["first@0"]["started_from"] is None
    # second@0 is first@1's checkpoint: evaluated once, the same predictions
    assert rows["second@0"]["answer"]["pass_at_1"] == rows["first@1"]["answer"]["pass_at_1"]
    # every figure recounted from predictions.parquet
    table = pq.read_table(report_dir / "predictions.parquet")
    assert report["tasks"] == 3  # --limit 3 of the 4 held-out problems
    assert table.num_rows == 4 * report["tasks"] * 2 and set(table.column("mode").to_pylist()) == {"answer"}
    for label, row in rows.items():
        mine = [r for r in table.to_pylist() if r["model"] == label]
        assert row["answer"]["pass_at_1"]["value"] == pytest.approx(sum(r["reward"] for r in mine) / len(mine))
        assert all(r["completion"] is not None and r["status"] in ("ok", "no_answer") for r in mine)
        assert row["answer"]["length"] == pytest.approx(sum(r["new_tokens"] for r in mine) / len(mine))
    table2 = {r["run"]: r for r in report["table2"]}
    assert table2["second"]["started_from"]["checkpoint"] == str(start.resolve())
    assert table2["first"]["pass_at_1_before"] == rows["first@0"]["answer"]["pass_at_1"]["value"]
    assert table2["first"]["delta"]["diff"] == pytest.approx(
        rows["first@1"]["answer"]["pass_at_1"]["value"] - rows["first@0"]["answer"]["pass_at_1"]["value"]
    )
    md = (report_dir / "report.md").read_text()
    assert "## Before and after RLVR" in md and "first@1 (rpt)" in md
    # answer tasks have no entropy band: the paired table has only the "all" column, and the scaling
    # table no rows for empty bands
    assert "| A − B | mode | all |" in md and "| answer | easy |" not in md


# `make test-long` (CI's 30 min): bit-exact resume is checked in `make test` by tests/test_train.py (a tied,
# warmed model whose every step has a gradient) and by the RMT and RLP resume tests
@pytest.mark.slow
@pytest.mark.long
def test_answer_resume_is_exact(tmp_path):
    """Stopped after step 2 and resumed, an answer-task run ends with the uninterrupted run's weights,
    bit for bit. The problems are ones the embedded model gets right about half the time ("repeat
    after me: the final answer is 7"), so steps have a gradient and the resume has state to lose."""
    corpus = tmp_path / "repeat.jsonl"
    corpus.write_text(
        "".join(
            json.dumps({"problem": f"Repeat after me: The final answer is {n}.", "answer": str(n)}) + "\n"
            for n in range(3, 15)
        )
    )
    tasks = tmp_path / "tasks"
    result = CliRunner().invoke(cli, ["answer-tasks", str(corpus), "--eval-fraction", "0", "--out", str(tasks)])
    assert result.exit_code == 0, result.output
    args = [*RLVR, "--model", "smollm2-135m", "--batch-size", "4", "--max-new-tokens", "16", "--save-every", "1"]
    args += ["--grad-clip", "0.2", "--seed", "0"]  # seed 0: steps 1 and 2 have mixed-reward groups
    rpt("train", tasks, "--out", tmp_path / "straight", "--steps", "3", *args)
    rpt("train", tasks, "--out", tmp_path / "resumed", "--steps", "2", *args)
    rpt("train", tasks, "--out", tmp_path / "resumed", "--steps", "3", "--resume", *args)
    lines = [(tmp_path / r / "metrics.jsonl").read_text().splitlines() for r in ("straight", "resumed")]
    metrics = [json.loads(x) for x in lines[0]]
    assert metrics[1]["grad_norm"] > 0 and metrics[1]["zero_variance_share"] < 1  # step 2 had a gradient
    strip = lambda line: {k: v for k, v in json.loads(line).items() if not k.endswith(("_s", "per_s"))}  # noqa: E731
    assert [strip(x) for x in lines[0]] == [strip(x) for x in lines[1]]
    a = load_file(tmp_path / "straight" / "checkpoints" / "step-000003" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "checkpoints" / "step-000003" / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_answer_figures_against_a_hand_count():
    """pass@1, pass@2, maj@2, no box and length of a fixed set of completions, counted by hand."""
    rows = {f.name: [] for f in PREDICTIONS_SCHEMA}
    fixed = [  # task, sample, completion, extracted answer, reward, tokens
        ("t1", 0, "so \\boxed{72}", "72", 1.0, 10),
        ("t1", 1, "so \\boxed{70}", "70", 0.0, 20),
        ("t2", 0, "\\boxed{5}", "5", 1.0, 30),
        ("t2", 1, "I think \\boxed{5}", "5", 1.0, 40),
        ("t3", 0, "no idea", None, 0.0, 50),
        ("t3", 1, "\\boxed{8}", "8", 0.0, 60),
    ]
    for task, sample, completion, answer, reward, tokens in fixed:
        for name, value in dict(
            task_id=task, model="m", mode="answer", sample=sample, prediction=answer, reward=reward, band="other",
            entropy=None, model_entropy=None, new_tokens=tokens, completion=completion, status="ok",
        ).items():  # fmt: skip
            rows[name].append(value)
    table = pa.Table.from_pydict(rows, schema=PREDICTIONS_SCHEMA)
    got = _answer_row(table, "m", {"t1": 0, "t2": 1, "t3": 2})
    # by hand: pass@1 = (1/2 + 1 + 0) / 3; pass@2 = (1 + 1 + 0) / 3; maj@2: t1 tie -> "72" first (right),
    # t2 "5" (right), t3 "8" (wrong) -> 2/3; no box: 1 of 6; length 210 / 6
    assert got["pass_at_1"]["value"] == pytest.approx(0.5)
    assert got["pass_at_k"]["value"] == pytest.approx(2 / 3)
    assert got["maj_at_k"]["value"] == pytest.approx(2 / 3)
    assert got["no_box"] == pytest.approx(1 / 6) and got["length"] == pytest.approx(35.0)
    assert got["samples"] == 2 and got["tasks"] == 3
    low, high = got["pass_at_1"]["ci_low"], got["pass_at_1"]["ci_high"]
    # Wilson, 1.5 of 3, z = 1.96: centre 0.5, half-width 1.96 * sqrt(0.25/3 + 1.96^2/36) / (1 + 1.96^2/3) = 0.3747
    assert (round(low, 4), round(high, 4)) == (0.1253, 0.8747)


@pytest.mark.slow
def test_trl_backend_trains_answer_tasks(answers, tiny_bpe_dir, tmp_path):
    model = tiny_llama(tmp_path / "policy", tiny_bpe_dir)
    out = tmp_path / "trl"
    done = rpt("train", answers, "--backend", "trl", "--model", model, "--out", out, "--steps", "1",
               "--allow-tokenizer-mismatch", *RLVR)  # fmt: skip
    assert "train: 1 steps" in done.stdout
    (metrics,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert 0.0 <= metrics["reward_mean"] <= 1.0
    assert (out / "checkpoints" / "step-000001").is_dir()


def test_export_answer_tasks_for_verl_and_trl(answers, tmp_path):
    """`rpt export-tasks --reward math`: verl rows hold the answer as ground truth, and its reward
    function and TRL's score them with the math reward."""
    from rpttrain.integrations.trl import rpt_reward
    from rpttrain.integrations.verl import compute_score

    for fmt in ("verl", "trl"):
        out = tmp_path / fmt
        run = CliRunner().invoke(
            cli,
            ["export-tasks", str(answers), "--format", fmt, "--out", str(out), "--split", "train",
             "--prompt-template", "answer", "--reward", "math", "--no-progress"],
        )  # fmt: skip
        assert run.exit_code == 0, run.output
        rows = pq.read_table(out / "train.parquet").to_pylist()
        assert len(rows) == 8  # the 12 problems less the 4 held out
        if fmt == "verl":
            for row in rows:
                truth = json.loads(row["reward_model"]["ground_truth"])
                assert truth["reward"] == "math" and truth["format"] == "answer"
                assert compute_score(row["data_source"], f"so \\boxed{{{truth['answer']}}}", truth) == 1.0
                assert compute_score(row["data_source"], "\\boxed{-1}", truth) == 0.0
                assert row["prompt"][0]["content"].endswith("final answer within \\boxed{}.")
        else:
            got = rpt_reward(
                [r["prompt"] for r in rows],
                [f"\\boxed{{{r['continuation']}}}" for r in rows],
                continuation=[r["continuation"] for r in rows],
                boundaries=[r["boundaries"] for r in rows],
                reward=[r["reward"] for r in rows],
                format=[r["format"] for r in rows],
            )
            assert got == [1.0] * len(rows)
    refused = CliRunner().invoke(cli, ["export-tasks", str(answers), "--format", "verl", "--out", str(tmp_path / "x")])
    assert refused.exit_code == 2 and "--reward prefix cannot score answer tasks" in refused.output
