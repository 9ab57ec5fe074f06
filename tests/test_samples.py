"""What the model wrote: `rpt samples` on a finished tiny run (every filter on the run's own
values), the same samples as a W&B table read back from an offline run, the TRL backend's lines,
and the examples of `rpt eval`'s report.

The tiny policy is sharpened (`sharp_llama`) so that sampling gives its greedy token: tasks whose
continuation is that token are right, the others wrong, in two bands.

Run: .venv/bin/python -m pytest -q tests/test_samples.py
"""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from cli.main import cli
from rptdata.errors import BadOption, DamagedFile, MissingUpstream, RptError
from rpttrain.data import load_tasks
from rpttrain.eval import EvalConfig, markdown, run_eval
from rpttrain.eval.examples import pick_examples
from rpttrain.samples import FIELDS, context_tail, filter_samples, read_samples, select_steps
from tests.rpt_fixtures import greedy_pairs, sharp_llama, write_tasks_dir

CONTEXTS = ["The quick brown", "over the lazy", "naïve", "The lazy dog", "café 世界", "fox jumps", "wörld", "12345"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_bpe_dir):
    """A sharp tiny model and tasks, in both splits one right and one wrong task in the hard band
    and in the medium band."""
    root = tmp_path_factory.mktemp("samples")
    model = sharp_llama(root / "model", tiny_bpe_dir)
    right = greedy_pairs(model, tiny_bpe_dir, CONTEXTS)
    assert len(right) >= 4, right
    wrong = [(c, " dog" if g != " dog" else " fox") for c, g in right]
    train = [right[0], wrong[1], right[2], wrong[3]]
    evals = [right[1], wrong[0], right[3], wrong[2]]
    bands = [2.0, 2.0, 1.2, 1.2]  # hard, hard, medium, medium
    return model, write_tasks_dir(root / "tasks", str(tiny_bpe_dir), train, eval_pairs=evals, entropies=bands)


@pytest.fixture(scope="module")
def run(tiny, tmp_path_factory):
    """`rpt train` through the CLI: 2 steps of 2 groups of 2, every step sampled (the 4 tasks,
    each drawn once), with --report-to wandb (offline) when wandb is installed."""
    model, tasks = tiny
    try:
        import wandb  # noqa: F401

        report_to = "wandb"
    except ImportError:
        report_to = "none"
    out = tmp_path_factory.mktemp("run") / "run"
    args = ["train", str(tasks), "--out", str(out), "--model", str(model), "--device", "cpu"]
    args += ["--steps", "2", "--batch-size", "2", "--group-size", "2", "--max-new-tokens", "1"]
    args += ["--prompt-template", "continuation", "--max-prompt-tokens", "32", "--lr", "1e-7"]
    args += ["--sample-every", "1", "--dynamic-sampling-from", "-1", "--report-to", report_to, "--no-progress"]
    with pytest.MonkeyPatch.context() as env:
        for name, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_PROJECT": "rpt-test"}.items():
            env.setenv(name, value)
        env.setenv("WANDB_CONSOLE", "off")  # in this process: leave pytest's and click's streams alone
        result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, (result.output, result.exception)
    return out, report_to


def samples_cli(*args: str):
    return CliRunner().invoke(cli, ["samples", *args])


def jsonl(result) -> list[dict]:
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_run_records_band_and_correct(run):
    out, _ = run
    lines = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert len(lines) == 8 and {x["step"] for x in lines} == {1, 2}
    assert {x["band"] for x in lines} == {"hard", "medium"}
    assert {x["correct"] for x in lines} == {True, False}  # the sharp model: right where the target is its token
    for x in lines:
        assert x["correct"] == (x["reward"] == 1.0) == (x["prediction"] == x["target"])
    assert [*read_samples(out).lines[0]][: len(FIELDS)] == list(FIELDS)


def test_cli_filters_on_the_runs_values(run):
    out, _ = run
    every = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    shown = jsonl(samples_cli(str(out), "--context-chars", "0"))  # not a terminal: jsonl
    assert [{k: v for k, v in s.items() if k in every[0]} for s in shown] == every
    assert [s["step"] for s in jsonl(samples_cli(str(out), "--step", "2"))] == [2] * 4
    assert jsonl(samples_cli(str(out), "--step", "1-2")) == jsonl(samples_cli(str(out), "--step", "1", "--step", "2"))
    assert {s["step"] for s in jsonl(samples_cli(str(out), "--step", "last"))} == {2}
    assert {s["step"] for s in jsonl(samples_cli(str(out), "--step", "2-"))} == {2}
    for band in ("hard", "medium"):
        got = jsonl(samples_cli(str(out), "--band", band, "--context-chars", "0"))
        assert got and [s["context"] for s in got] == [e["context"] for e in every if e["band"] == band]
    right = jsonl(samples_cli(str(out), "--right"))
    wrong = jsonl(samples_cli(str(out), "--wrong"))
    assert right and wrong and len(right) + len(wrong) == len(every)
    assert all(s["reward"] == 1.0 and s["prediction"] == s["target"] for s in right)
    assert all(s["reward"] == 0.0 for s in wrong)
    both = jsonl(samples_cli(str(out), "--band", "hard", "--wrong", "--step", "1,2"))
    assert both == [s for s in wrong if s["band"] == "hard"]
    # continuation predictions are never missing: no match, said on stderr, exit 0
    r = samples_cli(str(out), "--missing")
    assert r.exit_code == 0 and r.stdout == ""
    assert "no samples match" in r.stderr and "holds 8 samples of steps 1-2 (2 sampled); bands hard, medium" in r.stderr
    limited = samples_cli(str(out), "--limit", "3")
    assert len(jsonl(limited)) == 3 and "5 more match" in limited.stderr
    tails = jsonl(samples_cli(str(out), "--context-chars", "4"))
    assert all(
        s["context"] == ("…" + e["context"][-4:] if len(e["context"]) > 4 else e["context"])
        for s, e in zip(tails, every)
    )


def test_table_format_and_the_pager_only_on_a_terminal(run, monkeypatch):
    out, _ = run
    first = json.loads((out / "samples.jsonl").read_text().splitlines()[0])
    r = samples_cli(str(out), "--format", "table", "--step", "1", "--limit", "1")
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith(f"{out / 'samples.jsonl'}: 1 of 4 matching samples; it holds 8 samples of steps 1-2")
    assert f"── step 1 · band {first['band']} · reward {first['reward']:g} · " in r.stdout
    assert f"prediction  {json.dumps(first['prediction'], ensure_ascii=False)}" in r.stdout
    assert f"target      {json.dumps(first['target'], ensure_ascii=False)}" in r.stdout
    paged = []
    monkeypatch.setattr("cli.samples._is_tty", lambda: True)
    monkeypatch.setattr("click.echo_via_pager", lambda text: paged.append(text))
    r = samples_cli(str(out), "--step", "1")
    assert r.exit_code == 0 and r.stdout == "" and len(paged) == 1 and "── step 1" in paged[0]  # table by default


def test_clear_errors(run, tmp_path):
    out, _ = run
    r = samples_cli(str(tmp_path))
    assert r.exit_code == 1 and "not an `rpt train` run directory (no config.yaml)" in r.output
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.yaml").write_text("sample_every: 0\n")
    r = samples_cli(str(bare))
    assert r.exit_code == 1 and "no samples.jsonl" in r.output and "--sample-every 0" in r.output
    (bare / "config.yaml").write_text("sample_every: 10\n")
    assert "every --sample-every 10 steps" in samples_cli(str(bare)).output
    r = samples_cli(str(out), "--step", "two")
    assert r.exit_code == 2 and "--step 'two'" in r.output


def test_torn_last_line_is_left_out_and_a_bad_line_is_named(run, tmp_path):
    out, _ = run
    copy = tmp_path / "run"
    copy.mkdir()
    (copy / "config.yaml").write_text((out / "config.yaml").read_text())
    text = (out / "samples.jsonl").read_text()
    (copy / "samples.jsonl").write_text(text + text.splitlines()[0][:25])  # killed mid-line
    r = samples_cli(str(copy))
    assert r.exit_code == 0 and len(jsonl(r)) == 8 and "last line was cut short" in r.stderr
    lines = text.splitlines()
    (copy / "samples.jsonl").write_text("\n".join([lines[0], lines[1][:25], *lines[2:]]) + "\n")
    with pytest.raises(DamagedFile, match=r"samples.jsonl:2: not a samples line"):
        read_samples(copy)
    assert samples_cli(str(copy)).exit_code == 1


def test_older_and_trl_lines_read_with_band_unknown(tmp_path):
    """Lines of older rpt runs (no band, no correct) and of the TRL backend before it recorded
    context and target: fields read as None, `correct` from the reward, --band explains."""
    (tmp_path / "config.yaml").write_text("sample_every: 1\n")
    old = [
        {"step": 1, "context": "ab", "completion": " c", "prediction": " c", "target": " c", "reward": 1.0},
        {"step": 1, "completion": "x", "prediction": None, "reward": 0.0},  # TRL, before
    ]
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps(x) + "\n" for x in old))
    lines = read_samples(tmp_path).lines
    assert [x["correct"] for x in lines] == [True, False] and lines[1]["context"] is None and lines[0]["band"] is None
    assert filter_samples(lines, missing=True) == [lines[1]]
    with pytest.raises(RptError, match="record no band"):
        filter_samples(lines, bands=("hard",))
    r = samples_cli(str(tmp_path), "--format", "table")
    assert r.exit_code == 0 and "target      (not recorded)" in r.stdout and "prediction  (none)" in r.stdout
    assert "record no band" in samples_cli(str(tmp_path), "--band", "hard").output
    with pytest.raises(BadOption):
        select_steps(["3-1"], [1, 2, 3])
    with pytest.raises(MissingUpstream):
        read_samples(tmp_path / "nowhere")


def test_trl_reward_writes_the_same_fields(tmp_path):
    """The TRL backend's reward function writes samples.jsonl lines `rpt samples` reads: context,
    target and band from the dataset's columns; a completion without a box has no prediction."""
    from rpttrain.backends.trl_grpo import RptReward
    from rpttrain.prompts import load_prompt_format

    class State:
        global_step = 0

    reward = RptReward(load_prompt_format("v0"), "prefix", tmp_path / "samples.jsonl", sample_every=1)
    rewards = reward(
        prompts=["The quick brown", "The quick brown"],
        completions=["so \\boxed{ fox}", "no idea"],
        continuation=[" fox jumps", " fox jumps"],
        boundaries=[[4, 10], [4, 10]],
        band=["hard", "hard"],
        trainer_state=State(),
    )
    assert rewards == [1.0, 0.0]
    (tmp_path / "config.yaml").write_text("sample_every: 1\nbackend: trl\n")
    missing = jsonl(samples_cli(str(tmp_path), "--missing", "--band", "hard"))
    assert [(s["completion"], s["prediction"], s["target"], s["correct"]) for s in missing] == [
        ("no idea", None, " fox jumps", False)
    ]
    right = jsonl(samples_cli(str(tmp_path), "--right"))
    assert [(s["step"], s["context"], s["prediction"]) for s in right] == [(1, "The quick brown", " fox")]


def test_wandb_table_of_samples_reads_back_from_the_offline_run(run):
    out, report_to = run
    if report_to != "wandb":
        pytest.skip("wandb is not installed")
    from rpttrain.report_to import SAMPLE_COLUMNS
    from tests.test_report_to import read_offline_run, samples_table

    history, config, folder = read_offline_run(out)
    assert [h["_step"] for h in history] == [1, 2] and config["sample_every"] == 1
    assert all(h["samples/_type"] == "table-file" for h in history)  # a table at every sampled step
    lines = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    for step in (1, 2):
        table = samples_table(folder, step)
        assert table["columns"] == list(SAMPLE_COLUMNS)
        assert table["data"] == [[x[c] for c in SAMPLE_COLUMNS] for x in lines if x["step"] == step]


# ---------------------------------------------------------------------------------------------
# rpt eval's examples


def test_eval_report_examples_are_seeded_and_match_the_predictions(tiny, tmp_path):
    model, tasks = tiny
    config = dict(tasks_dir=str(tasks), models=(str(model),), device="cpu", batch_size=4, progress=False)
    report = run_eval(EvalConfig(out=str(tmp_path / "a"), mode="both", prompt_template="continuation", **config))
    assert json.loads((tmp_path / "a" / "report.json").read_text())["examples"] == report["examples"]
    table = pq.read_table(tmp_path / "a" / "predictions.parquet")
    rows = {(r["task_id"], r["model"], r["mode"], r["sample"]): r for r in table.to_pylist()}
    by_id = {t["task_id"]: t for t in load_tasks(tasks, "eval")}
    label = report["rows"][0]["model"]
    assert [(g["model"], g["mode"]) for g in report["examples"]] == [(label, "ntp"), (label, "reasoning")]
    kinds = set()
    for group in report["examples"]:
        assert list(group["bands"]) == ["medium", "hard"]  # "other" first when present, then the bands' order
        for band, by_kind in group["bands"].items():
            for kind, examples in by_kind.items():
                assert len(examples) <= 2
                for ex in examples:  # each field as predictions.parquet and the tasks hold it
                    row = rows[(ex["task_id"], group["model"], group["mode"], ex["sample"])]
                    assert row["band"] == band and (row["reward"] >= 1.0) == (kind == "right")
                    for key in ("prediction", "reward", "completion", "status"):
                        assert ex[key] == row[key], key
                    assert ex["target"] == by_id[ex["task_id"]]["continuation"]
                    assert ex["context"] == context_tail(by_id[ex["task_id"]]["context"], 200)
                    kinds.add(kind)
    assert kinds == {"right", "wrong"}  # the sharp model gets the tasks with its own token right
    md = (tmp_path / "a" / "report.md").read_text()
    assert "## Examples" in md and markdown.format_examples(report) in md

    # the draw: five samples of every row, two picked per group, by the seed alone
    import pyarrow as pa

    copies = pa.concat_tables(
        [
            table.set_column(table.schema.get_field_index("sample"), "sample", pa.array([k] * len(table), pa.int32()))
            for k in range(5)
        ]
    )
    subjects = [(label, "ntp")]
    shuffled = copies.take(pa.array(list(reversed(range(len(copies))))))  # another stored order (a resumed run)
    picks = {seed: pick_examples(copies, list(by_id.values()), subjects, ["medium", "hard"], seed) for seed in range(6)}
    assert picks[0] == pick_examples(shuffled, list(by_id.values()), subjects, ["medium", "hard"], 0)
    assert len({json.dumps(p) for p in picks.values()}) > 1  # other seeds, other draws
    for p in picks.values():
        for by_kind in p[0]["bands"].values():
            for examples in by_kind.values():
                assert len(examples) == 2 and len({e["sample"] for e in examples}) == 2
