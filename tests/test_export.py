"""`rpt export-tasks` (rpttrain/export.py): export, load with `datasets`, score through the verl
and TRL wrappers, and check they agree with rpttrain.reward.

Run: .venv/bin/python -m pytest -q tests/test_export.py
"""

from __future__ import annotations

import doctest
import json

import datasets
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from cli.main import cli
from rptdata.errors import ManifestMismatch, MissingUpstream
from rptdata.tasks import MakeTasksConfig, run_make_tasks
from rpttrain import export as export_mod
from rpttrain.data import load_tasks
from rpttrain.export import ExportConfig, run_export_tasks
from rpttrain.integrations.trl import rpt_reward
from rpttrain.integrations.verl import compute_score
from rpttrain.prompts import load_prompt_format, render_prompt
from rpttrain.reward import extract_prediction, first_token_reward, prefix_reward
from tests.test_tasks import build_scored, pick_seed, read_docs


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("export_src")
    scored, prep = build_scored(root)
    seed = pick_seed(list(read_docs(prep)), 0.3)
    out = root / "tasks"
    run_make_tasks(
        MakeTasksConfig(
            str(scored),
            str(out),
            threshold=0.5,
            context_tokens=24,
            continuation_tokens=4,
            eval_fraction=0.3,
            seed=seed,
            max_tasks=120,
            progress=False,
        )
    )
    return out


def load(out, splits=("train", "eval")):
    return datasets.load_dataset("parquet", data_files={s: str(out / f"{s}.parquet") for s in splits})


def completions_for(task):
    """A right guess (the first whole-character prefix of the continuation), a longer right one,
    a wrong one, a partial-token one, and no box at all."""
    raw, bounds = task["continuation"].encode(), task["boundaries"]
    first = next(raw[:b].decode() for b in bounds if _decodes(raw[:b]))
    return [first, task["continuation"], "zz" + first, task["continuation"][:-1] or "q", None]


def _decodes(b: bytes) -> bool:
    try:
        b.decode()
        return True
    except UnicodeDecodeError:
        return False


def boxed(guess):
    return "no answer here" if guess is None else f"<think>hmm \\boxed{{nope}}</think> so \\boxed{{{guess}}}"


def test_doctests():
    assert doctest.testmod(export_mod).failed == 0


def test_verl_export_scores_like_prefix_reward(tasks_dir, tmp_path):
    out = tmp_path / "verl"
    m = run_export_tasks(ExportConfig(str(tasks_dir), str(out), "verl", progress=False))
    tm = json.loads((tasks_dir / "manifest.json").read_text())
    assert m["rows"] == tm["counts"]["tasks"] and m["rows"]["train"] == 120
    path, name = m["verl_overrides"]
    assert name == "reward.custom_reward_function.name=compute_score"
    assert path.startswith("reward.custom_reward_function.path=") and path.endswith("rpttrain/integrations/verl.py")
    ds = load(out)
    wins = 0
    for split in ("train", "eval"):
        tasks = load_tasks(tasks_dir, split)
        assert len(ds[split]) == len(tasks)
        for row, task in zip(ds[split], tasks):
            assert row["data_source"] == "rpt" and row["extra_info"]["task_id"] == task["task_id"]
            assert task["context"] in row["prompt"][-1]["content"] and row["prompt"][-1]["role"] == "user"
            for guess in completions_for(task):
                c = boxed(guess)
                want = prefix_reward(extract_prediction(c), task["continuation"], task["boundaries"])
                got = compute_score(row["data_source"], c, row["reward_model"]["ground_truth"], row["extra_info"])
                assert got == want
                wins += want
    assert wins >= 2 * (len(ds["train"]) + len(ds["eval"]))  # the two right guesses always win


def test_trl_export_raw_continuation_first_token(tasks_dir, tmp_path):
    out = tmp_path / "trl"
    run_export_tasks(
        ExportConfig(
            str(tasks_dir),
            str(out),
            "trl",
            split="eval",
            prompt_template="continuation",
            reward="first-token",
            progress=False,
        )
    )
    assert not (out / "train.parquet").exists()
    ds = load(out, ("eval",))["eval"]
    tasks = load_tasks(tasks_dir, "eval")
    assert ds["prompt"] == [t["context"] for t in tasks]
    for k in range(5):
        completions = [completions_for(t)[k] or "" for t in tasks]
        got = rpt_reward(
            ds["prompt"],
            completions,
            continuation=ds["continuation"],
            boundaries=ds["boundaries"],
            reward=ds["reward"],
            format=ds["format"],
            task_id=ds["task_id"],
        )
        want = [first_token_reward(c, t["continuation"], t["boundaries"]) for c, t in zip(completions, tasks)]
        assert got == want
    # prefix reward on the same columns agrees too
    completions = [t["continuation"] for t in tasks]
    assert rpt_reward(
        ds["prompt"], completions, continuation=ds["continuation"], boundaries=ds["boundaries"], format=ds["format"]
    ) == [1.0] * len(tasks)


def test_trl_export_chat_with_tokenizer_and_file_template(tasks_dir, tmp_path, smollm2_tokenizer):
    template = tmp_path / "mine.txt"
    template.write_text("Continue this text. Answer in \\boxed{}.\n\n{context}")
    out = tmp_path / "trl"
    m = run_export_tasks(
        ExportConfig(
            str(tasks_dir),
            str(out),
            "trl",
            split="train",
            prompt_template=str(template),
            tokenizer="smollm2-135m",
            progress=False,
        )
    )
    assert m["prompt_template"] == f"file:{template}"
    ds = load(out, ("train",))["train"]
    tasks = load_tasks(tasks_dir, "train")
    fmt = load_prompt_format(str(template))
    assert ds[0]["prompt"] == [
        {"role": "user", "content": template.read_text().replace("{context}", tasks[0]["context"])}
    ]
    assert ds[0]["prompt_text"] == render_prompt(fmt, tasks[0]["context"], smollm2_tokenizer)
    conversations = [[{"role": "assistant", "content": boxed(t["continuation"])}] for t in tasks]
    got = rpt_reward(
        ds["prompt"],
        conversations,
        continuation=ds["continuation"],
        boundaries=ds["boundaries"],
        reward=ds["reward"],
        format=ds["format"],
        prompt_text=ds["prompt_text"],
    )
    want = [
        prefix_reward(extract_prediction(c[0]["content"]), t["continuation"], t["boundaries"])
        for c, t in zip(conversations, tasks)
    ]
    assert got == want and sum(got) > len(tasks) / 2  # a continuation with an unmatched brace cannot be boxed


def test_verl_raw_prompt_has_prompt_text(tasks_dir, tmp_path):
    out = tmp_path / "verl"
    run_export_tasks(
        ExportConfig(str(tasks_dir), str(out), "verl", split="eval", prompt_template="continuation", progress=False)
    )
    rows = pq.read_table(out / "eval.parquet").to_pylist()
    tasks = load_tasks(tasks_dir, "eval")
    assert all(
        r["extra_info"]["raw_prompt"] and r["extra_info"]["prompt_text"] == t["context"] for r, t in zip(rows, tasks)
    )
    assert all(
        compute_score("rpt", t["continuation"], r["reward_model"]["ground_truth"]) == 1.0 for r, t in zip(rows, tasks)
    )


def test_refusals_and_overwrite(tasks_dir, tmp_path):
    out = tmp_path / "x"
    run_export_tasks(ExportConfig(str(tasks_dir), str(out), "verl", progress=False))
    with pytest.raises(ManifestMismatch, match="--overwrite"):
        run_export_tasks(ExportConfig(str(tasks_dir), str(out), "trl", progress=False))
    run_export_tasks(ExportConfig(str(tasks_dir), str(out), "trl", split="train", overwrite=True, progress=False))
    assert not (out / "eval.parquet").exists()  # no stale split left behind
    assert json.loads((out / "manifest.json").read_text())["format"] == "trl"
    with pytest.raises(MissingUpstream, match="make-tasks"):
        run_export_tasks(ExportConfig(str(out), str(tmp_path / "y"), "verl", progress=False))  # an export, not tasks
    with pytest.raises(MissingUpstream, match="no manifest.json"):
        run_export_tasks(ExportConfig(str(tmp_path / "missing"), str(tmp_path / "y"), "verl", progress=False))
    with pytest.raises(ValueError, match="format"):
        ExportConfig(str(tasks_dir), str(out), "openrlhf")
    with pytest.raises(ValueError, match="reward 'dense' needs the policy's probability"):
        ExportConfig(str(tasks_dir), str(out), "verl", reward="dense")
    with pytest.raises(ValueError, match="unknown prompt format"):
        run_export_tasks(
            ExportConfig(str(tasks_dir), str(tmp_path / "z"), "verl", prompt_template="v99", progress=False)
        )


def test_cli(tasks_dir, tmp_path):
    out = tmp_path / "c"
    r = CliRunner().invoke(
        cli,
        [
            "export-tasks",
            str(tasks_dir),
            "--format",
            "verl",
            "--out",
            str(out),
            "--prompt-template",
            "v2",
            "--no-progress",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "reward.custom_reward_function.path=" in r.output and "train 120 rows" in r.output
    assert json.loads((out / "manifest.json").read_text())["prompt_template"] == "v2"
    r = CliRunner().invoke(
        cli, ["export-tasks", str(tasks_dir), "--format", "verl", "--out", str(out), "--no-progress"]
    )
    assert r.exit_code == 1 and "--overwrite" in r.output
    r = CliRunner().invoke(
        cli,
        ["export-tasks", str(tasks_dir), "--format", "trl", "--out", str(tmp_path / "d"), "--prompt-template", "nope"],
    )
    assert r.exit_code == 2 and "unknown prompt format" in r.output
