"""`rpt eval --lm-eval-tasks`: lm-evaluation-harness run for real on the embedded model, its numbers
compared with a direct `lm_eval.simple_evaluate` on the same HF folder.

Run: .venv/bin/python -m pytest -q tests/test_lm_eval.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from rpttrain.eval import EvalConfig
from rpttrain.eval.harness_report import format_harness, split_metric

RPT = [sys.executable, "-c", "from cli.main import cli; cli()"]
REPO = Path(__file__).resolve().parents[1]
DOCS = [
    "The quick brown fox jumps over the lazy dog. It was a sunny day in the park.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "Paris is the capital of France, and Berlin is the capital of Germany.",
    "One plus one equals two. Two plus two equals four.",
    "The moon orbits the Earth about once every twenty-seven days.",
    "Cats and dogs are common pets in many households.",
    "A triangle has three sides, and a square has four sides.",
    "The library opens at nine in the morning on weekdays.",
]
MC_YAML = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def test_options_are_checked(tmp_path):
    with pytest.raises(ValueError, match="--lm-eval-limit must be at least 1"):
        EvalConfig(tasks_dir="t", lm_eval_tasks=("x",), lm_eval_limit=0)
    with pytest.raises(ValueError, match="not a folder of task YAMLs"):
        EvalConfig(tasks_dir="t", lm_eval_tasks=("x",), lm_eval_include=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="needs --lm-eval-tasks"):
        EvalConfig(tasks_dir="t", models=("m",), lm_eval_include=str(tmp_path))


def test_unknown_task_names_are_refused_before_any_model_loads(tiny_corpus):
    from rptdata.errors import RptError
    from rpttrain.eval.harness import HarnessSettings, check_tasks

    check_tasks(HarnessSettings(("rpt_heldout_bpb", "tiny_mc"), str(tiny_corpus / "include")))
    with pytest.raises(RptError, match=r"nosuchtask not known to lm-eval or in .*include; local task YAMLs go in"):
        check_tasks(HarnessSettings(("tiny_mc", "nosuchtask"), str(tiny_corpus / "include")))


def test_harness_table_shows_value_and_stderr():
    assert split_metric("acc_norm_stderr,none") == ("acc_norm", "none", True)
    report = {
        "rows": [{"model": "m", "mode": "ntp", "bands": {"all": {"accuracy": 0.25}}}],
        "lm_eval": {
            "settings": {},
            "subjects": [
                {
                    "model": "m",
                    "run": None,
                    "step": None,
                    "compute": None,
                    "lm_eval": {
                        "t": {
                            "name": "t",
                            "sample_len": 4,
                            "acc,none": 0.5,
                            "acc_stderr,none": 0.25,
                            "bits_per_byte,none": 1.5,
                            "bits_per_byte_stderr,none": None,
                        }
                    },
                }
            ],
        },
    }
    assert format_harness(report).splitlines()[2:] == [
        "| model | documents | acc | bits_per_byte | next-token accuracy (all) |",
        "|---|---|---|---|---|",
        "| m | 4 | 0.5 ± 0.25 | 1.5 | 25.00 |",
    ]


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory):
    """A prepared corpus of 8 documents (4 of them eval by the split rule seed 0, fraction 0.5),
    a tasks directory over it, and a local multiple-choice task folder."""
    pytest.importorskip("lm_eval")
    from rptdata.models import local_model_dir
    from tests.rpt_fixtures import write_tasks_dir

    root = tmp_path_factory.mktemp("lm_eval")
    (root / "corpus.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    subprocess.run(
        RPT + ["prepare", str(root / "corpus.jsonl"), "--out", str(root / "prep")],
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    pairs = [("The capital of France is", " Paris"), ("One, two, three, four,", " five")]
    write_tasks_dir(root / "tasks", local_model_dir("smollm2-135m"), pairs, pairs, prepared_dir=str(root / "prep"))
    include = root / "include"
    include.mkdir()
    items = [
        ("The capital of France is", ["Paris", "Rome", "Tokyo"], 0),
        ("Two plus two equals", ["five", "four", "ten"], 1),
        ("Water boils at one hundred degrees", ["Fahrenheit", "Kelvin", "Celsius"], 2),
    ]
    (include / "tiny_mc.jsonl").write_text(
        "".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in items)
    )
    (include / "tiny_mc.yaml").write_text(MC_YAML.format(data=json.dumps(str(include / "tiny_mc.jsonl"))))
    return root


@pytest.mark.slow
def test_rpt_eval_reports_the_harness_numbers_of_a_direct_lm_eval_run(tiny_corpus):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from rptdata.models import local_model_dir
    from rptdata.tasks.taskdef import split_of

    out = tiny_corpus / "report"
    cmd = RPT + [
        "eval",
        str(tiny_corpus / "tasks"),
        "--model",
        "smollm2-135m",
        "--lm-eval-tasks",
        "rpt_heldout_bpb,tiny_mc",
        "--lm-eval-include",
        str(tiny_corpus / "include"),
        "--lm-eval-limit",
        "3",
        "--lm-eval-batch-size",
        "4",
        "--out",
        str(out),
        "--no-progress",
    ]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    got = report["lm_eval"]["subjects"][0]["lm_eval"]
    # the built-in task holds exactly the eval-split documents of the prepared corpus, in order
    docs = pq.read_table(tiny_corpus / "prep" / "docs" / "part-00000.parquet", columns=["doc_id", "text"]).to_pylist()
    held_out = [d["text"] for d in docs if split_of(d["doc_id"], 0, 0.5) == "eval"]
    data = [json.loads(line) for line in (out / "lm_eval" / "tasks" / "rpt_heldout_bpb.jsonl").read_text().splitlines()]
    assert [d["text"] for d in data] == held_out and 0 < len(held_out) < len(DOCS)
    # the same harness, directly, on the same HF folder: the numbers must be equal
    direct = lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": local_model_dir("smollm2-135m"), "dtype": "float32", "device": "cpu"},
        tasks=["rpt_heldout_bpb", "tiny_mc"],
        limit=3,
        batch_size=4,
        log_samples=False,
        task_manager=TaskManager(include_path=[str(tiny_corpus / "include"), str(out / "lm_eval" / "tasks")]),
    )
    for task, metrics in direct["results"].items():
        for key, value in metrics.items():
            if key != "alias":
                assert got[task][key] == (None if value == "N/A" else value), (task, key)
    assert got["rpt_heldout_bpb"]["bits_per_byte,none"] > 0 and got["tiny_mc"]["sample_len"] == 3
    md = (out / "report.md").read_text()
    assert "### rpt_heldout_bpb" in md and f"{got['rpt_heldout_bpb']['bits_per_byte,none']:.5g}" in md
    # a resumed evaluation reuses the finished subject's harness results instead of running it again
    result_file = next((out / "lm_eval" / "results").glob("*.json"))
    stamp = result_file.stat().st_mtime_ns
    (out / "report.json").unlink()
    proc = subprocess.run(cmd + ["--resume"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert result_file.stat().st_mtime_ns == stamp and "Running loglikelihood" not in proc.stderr
    assert json.loads((out / "report.json").read_text())["lm_eval"]["subjects"][0]["lm_eval"] == got


def test_checkpoint_tables_and_plot_against_compute(tmp_path):
    from rpttrain.eval.harness_report import plot_harness

    def subject(model, run, step, compute, bpb):
        return {
            "model": model,
            "run": run,
            "step": step,
            "compute": compute,
            "lm_eval": {
                "rpt_heldout_bpb": {
                    "name": "rpt_heldout_bpb",
                    "sample_len": 4,
                    "bits_per_byte,none": bpb,
                    "bits_per_byte_stderr,none": None,
                }
            },
        }

    subjects = [
        subject("rpt@0", "rpt", 0, 0.0, 1.18),
        subject("rpt@1", "rpt", 1, 1e10, 1.17),
        subject("ntp@0", "ntp", 0, 0.0, 1.18),
        subject("ntp@1", "ntp", 1, 2e10, 1.16),
    ]
    report = {"rows": [], "lm_eval": {"settings": {}, "subjects": subjects}}
    lines = format_harness(report).splitlines()
    assert lines[2] == "| model | step | compute (FLOPs) | documents | bits_per_byte |"
    assert lines[5] == "| rpt@1 | 1 | 1e+10 | 4 | 1.17 |"
    assert plot_harness(report, tmp_path / "lm_eval.png") and (tmp_path / "lm_eval.png").stat().st_size > 1000
    # models without checkpoints: nothing against compute
    assert not plot_harness({"lm_eval": {"subjects": [subject("m", None, None, None, 1.2)]}}, tmp_path / "none.png")
