"""`rpt train` as users run it: the CLI in a subprocess, defaults kept, every backend to its final
line; the memory preflight sized from the data (RUN/preflight.json, --dry-run, refusals); a TRL
run with torn log lines resumes with each step logged once.

Run: .venv/bin/python -m pytest -q tests/test_train_cli.py
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.rpt_fixtures import write_tasks_dir

RPT = str(Path(sys.executable).with_name("rpt"))
PAIRS = [
    ("1, 2, 3, 4, 5,", " 6"),
    ("The capital of France is", " Paris"),
    ("Monday, Tuesday,", " Wednesday"),
    ("She opened the", " door"),
]
# the README's CPU command, sized down: one sampled token, two groups of four
TINY = [
    "--model",
    "smollm2-135m",
    "--device",
    "cpu",
    "--steps",
    "1",
    "--batch-size",
    "2",
    "--group-size",
    "4",
    "--max-new-tokens",
    "1",
    "--prompt-template",
    "continuation",
    "--max-prompt-tokens",
    "64",
    "--dynamic-sampling-from",
    "-1",
    "--no-progress",
]
SUMMARY = re.compile(r"^train: (\d+) steps.*, ([\d,]+) samples, [\d.e+]+ FLOPs -> ", re.M)


def rpt(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([RPT, *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> Path:
    return write_tasks_dir(tmp_path_factory.mktemp("tasks") / "tasks", "smollm2-135m", PAIRS, eval_pairs=PAIRS[:1])


# -- the preflight --------------------------------------------------------------------------------
def test_dry_run_sizes_from_the_tasks_not_the_limit(tasks, tmp_path):
    """Default --max-prompt-tokens (4096) and template (v0): the estimate is sized from the tasks'
    longest context (a few tokens), prints by part, exits 0, and writes nothing."""
    out = tmp_path / "run"
    done = rpt(
        "train",
        str(tasks),
        "--out",
        str(out),
        "--model",
        "smollm2-135m",
        "--device",
        "cpu",
        "--batch-size",
        "2",
        "--group-size",
        "2",
        "--max-new-tokens",
        "12",
        "--dry-run",
    )
    assert done.returncode == 0, done.stderr
    text = done.stdout
    for part in ("weights", "gradients", "adamw", "activations", "attention", "logits", "peak"):
        assert re.search(rf"^\s+{part}\s+[\d.]+ GiB", text, re.M), (part, text)
    seq = int(re.search(r"sequences of (\d+) tokens", text).group(1))
    assert seq < 300, text  # the v0 template (~150 tokens) + a few-token context + 12 new tokens, not 4096 + 12
    assert "attention kernel flash" in text and "verdict: fits" in text
    assert not out.exists()


def test_dry_run_refuses_with_the_deciding_part_and_one_option(tasks, tmp_path):
    done = rpt(
        "train",
        str(tasks),
        "--out",
        str(tmp_path / "run"),
        "--model",
        "smollm2-135m",
        "--device",
        "cpu",
        "--memory-budget-gib",
        "2.5",
        "--dry-run",
    )
    assert done.returncode == 1
    assert "verdict: does-not-fit" in done.stdout
    assert "What decides it: adamw" in done.stderr and "--backend verl" in done.stderr, done.stderr
    # 512 completions of a few tokens fill the default 16k-token micro-batch: activations decide it,
    # and a smaller micro-batch fits
    # one CLI line, refused, then run again with the option the refusal names
    args = [
        "train",
        str(tasks),
        "--out",
        str(tmp_path / "run"),
        "--model",
        "smollm2-135m",
        "--device",
        "cpu",
        "--max-new-tokens",
        "12",
        "--batch-size",
        "64",
        "--group-size",
        "8",
        "--memory-budget-gib",
        "6",
    ]
    done = rpt(*args, "--dry-run")
    assert done.returncode == 1
    assert "What decides it: activations" in done.stderr, done.stderr
    way = re.search(r"It fits with --micro-batch-tokens (\d+)", done.stderr)
    assert way, done.stderr
    fits = rpt(*args, "--micro-batch-tokens", way.group(1), "--dry-run")
    assert fits.returncode == 0 and "verdict: fits" in fits.stdout, fits.stdout


def test_warns_when_g_or_t_differs_from_the_live_estimate(tasks, tmp_path):
    """Tasks filtered by --min-live for G=8, T=0.8: a run with G=2 is told so; G=8 is not."""
    import shutil

    copy = tmp_path / "tasks"
    shutil.copytree(tasks, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["live_estimate"] = {"group_size": 8, "temperature": 0.8, "min_live": 0.2}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    args = ["train", str(copy), "--model", "smollm2-135m", "--device", "cpu", "--batch-size", "2", "--dry-run"]
    other = rpt(*args, "--out", str(tmp_path / "a"), "--group-size", "2", "--temperature", "1.0")
    assert other.returncode == 0, other.stderr
    assert "make-tasks estimated live groups for G=8 (this run: 2), T=0.8 (this run: 1)" in other.stderr
    assert "--min-live 0.2 dropped positions" in other.stderr
    same = rpt(*args, "--out", str(tmp_path / "b"), "--group-size", "8")
    assert same.returncode == 0 and "estimated live groups" not in same.stderr, same.stderr


def test_estimate_only_warns_inside_its_error_band():
    from rpttrain.memory import GIB, check_fits, lower_bound

    parts = {
        "weights": GIB,
        "gradients": GIB,
        "adamw": 2 * GIB,
        "compute_copy": 0,
        "reference": 0,
        "vllm": 0,
        "runtime": GIB,
        "activations": 4 * GIB,
        "attention": 0,
        "logits": 0,
        "rollout": 0,
    }
    parts["peak"] = 9 * GIB
    assert lower_bound(parts) == 7 * GIB  # the exact parts, and the activations at half
    assert check_fits(parts, 10 * GIB) == "fits"
    assert check_fits(parts, 8 * GIB) == "may-not-fit"  # a warning: it may well fit
    assert check_fits(parts, 6 * GIB) == "does-not-fit"


@pytest.mark.slow
def test_estimate_matches_the_measured_peak(tasks, tmp_path):
    """Two cells of `make bench-memory`'s grid, as users run them: the estimate in
    RUN/preflight.json is within 0.5x-2x of the run's measured peak rise."""
    from rpttrain.memory import ESTIMATE_ERROR

    for name, extra in (("rpt1", []), ("ntp", ["--objective", "ntp", "--ntp-positions", "tasks"])):
        out = tmp_path / name
        done = rpt("train", str(tasks), "--out", str(out), *TINY, *extra, "--steps", "2")  # step 2 holds AdamW's state
        assert done.returncode == 0, done.stderr[-3000:]
        record = json.loads((out / "preflight.json").read_text())
        ratio = record["measured"]["estimate_over_measured"]
        assert ESTIMATE_ERROR[0] <= ratio <= ESTIMATE_ERROR[1], (name, record["estimate_bytes"], record["measured"])
        assert record["sized_from"]["data"]["longest_context_tokens"] < 20


# -- every backend through the CLI ----------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["rpt", "trl"])
def test_backend_runs_to_its_summary_line(backend, tasks, tmp_path):
    out = tmp_path / "run"
    done = rpt("train", str(tasks), "--out", str(out), "--backend", backend, *TINY)
    assert done.returncode == 0, done.stderr[-3000:]
    m = SUMMARY.search(done.stdout)
    assert m, done.stdout
    assert (int(m.group(1)), int(m.group(2).replace(",", ""))) == (1, 8)  # 1 step of 2 groups of 4
    assert json.loads((out / "preflight.json").read_text())["measured"]["rise_bytes"] > 0
    assert "Loading weights" not in done.stderr  # --no-progress silences transformers' bars too


def test_verl_backend_writes_its_launch(tasks, tmp_path):
    out = tmp_path / "run"
    done = rpt(
        "train",
        str(tasks),
        "--out",
        str(out),
        "--backend",
        "verl",
        "--model",
        "smollm2-135m",
        "--gpus-per-node",
        "8",
        "--nodes",
        "2",
        "--max-prompt-tokens",
        "64",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("train --backend verl: launch with: ")
    assert (out / "verl" / "launch.sh").exists()


# -- a TRL run that died mid-write resumes ----------------------------------------------------------
# `make test-long` (CI's 30 min): tests/test_backends_trl.py kills and resumes a TRL run in `make test`
@pytest.mark.slow
@pytest.mark.long
def test_trl_resume_after_torn_log_lines(tasks, tmp_path):
    """A TRL run killed after logging step 2 but before its checkpoint: metrics.jsonl and
    samples.jsonl end in a torn line. --resume continues from checkpoint 1 and logs steps 1..2
    exactly once."""
    import shutil

    out = tmp_path / "run"
    args = [
        "train",
        str(tasks),
        "--out",
        str(out),
        "--backend",
        "trl",
        *TINY,
        "--steps",
        "2",
        "--save-every",
        "1",
        "--sample-every",
        "1",
    ]
    assert rpt(*args).returncode == 0
    shutil.rmtree(out / "trl" / "checkpoint-2")
    (out / "checkpoints" / "step-000002").unlink()
    for name in ("metrics.jsonl", "samples.jsonl"):
        with (out / name).open("a") as f:
            f.write('{"step": 3, "rew')
    done = rpt(*args, "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    sample_steps = sorted({json.loads(line)["step"] for line in (out / "samples.jsonl").read_text().splitlines()})
    assert sample_steps == [1, 2]
