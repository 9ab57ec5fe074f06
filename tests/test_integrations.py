"""Tests for rpttrain/integrations/{verl,trl}.py: the wrappers agree with reward.py, rows round-trip.

Run: .venv/bin/python -m pytest -q tests/test_integrations.py
"""

import json

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rpttrain.integrations.trl import completion_text, rpt_reward, task_to_trl_row
from rpttrain.integrations.verl import compute_score, task_to_verl_row
from rpttrain.prompts import PROMPT_FORMATS, extract_verbatim
from rpttrain.reward import extract_prediction, first_token_reward, prefix_reward

CONT, BOUNDS = " paragraph is", [5, 10, 13]

# (completion, format): the expected score is always the reward of the format's extraction.
CASES = [
    ("<think>hmm</think>\\boxed{ para}", "v0"),
    ("<think>hmm</think>\\boxed{ paragraph}", "v2"),
    ("<think>\\boxed{ para}</think> no box", "v6"),
    ("<think>\\boxed{ x}</think>\\boxed{ para}", "v0"),
    ("\\boxed{ par}", "v0"),
    ("\\boxed{\\text{ para}}", "v0"),
    (" para", "v0"),
    (" para", "continuation"),
    (" paragraph is", "continuation"),
    (" paragraph i", "continuation"),
    ("", "continuation"),
    ("\\boxed{ para}", "continuation"),
]

TASKS = [
    {
        "task_id": "d0:4",
        "doc_id": "d0",
        "pos": 4,
        "context": "Let $x=\\frac{a}{b}$. This",
        "continuation": CONT,
        "boundaries": BOUNDS,
        "entropy": 1.25,
        "band": "medium",
    },
    {
        "task_id": "d1:9",
        "doc_id": "d1",
        "pos": 9,
        "context": "{context} é {",
        "continuation": " =é",
        "boundaries": [2, 3, 4],
        "entropy": 0.7,
        "band": "easy",
    },
]


def _expected(completion, fmt_name, reward_fn):
    extract = extract_verbatim if fmt_name == "continuation" else extract_prediction
    return reward_fn(extract(completion), CONT, BOUNDS)


@pytest.mark.parametrize("completion, fmt_name", CASES)
@pytest.mark.parametrize("reward_name, reward_fn", [("prefix", prefix_reward), ("first-token", first_token_reward)])
def test_wrappers_agree_with_reward(completion, fmt_name, reward_name, reward_fn):
    expected = _expected(completion, fmt_name, reward_fn)
    gt = {"continuation": CONT, "boundaries": BOUNDS, "reward": reward_name, "format": fmt_name}
    assert compute_score("rpt", completion, gt) == expected
    assert compute_score("rpt", completion, json.dumps(gt), extra_info={}) == expected
    kwargs = dict(continuation=[CONT], boundaries=[BOUNDS], reward=[reward_name], format=[fmt_name])
    assert rpt_reward(["p"], [completion], **kwargs) == [expected]
    conversation = [{"role": "user", "content": "p"}, {"role": "assistant", "content": completion}]
    assert rpt_reward(["p"], [conversation], **kwargs, trainer_state=None) == [expected]


def test_case_table_covers_both_outcomes():
    scores = {_expected(c, f, prefix_reward) for c, f in CASES}
    assert scores == {0.0, 1.0}


def test_compute_score_defaults_to_prefix_and_v0():
    assert compute_score("rpt", "\\boxed{ paragraph}", {"continuation": CONT, "boundaries": BOUNDS}) == 1.0
    with pytest.raises(ValueError, match="unknown reward"):
        compute_score("rpt", "x", {"continuation": CONT, "boundaries": BOUNDS, "reward": "oracle"})
    with pytest.raises(ValueError, match="asks a judge model"):  # verl's reward function has no model to ask
        compute_score("rpt", "x", {"continuation": CONT, "boundaries": BOUNDS, "reward": "judge"})
    with pytest.raises(ValueError, match="reward 'dense' needs the policy's probability"):
        compute_score("rpt", "x", {"continuation": CONT, "boundaries": BOUNDS, "reward": "dense"})


def test_rpt_reward_broadcasts_names_and_checks_lengths():
    out = rpt_reward(["p"] * 2, ["\\boxed{ para}", " para"], continuation=[CONT] * 2, boundaries=[BOUNDS] * 2)
    assert out == [1.0, 0.0]
    out = rpt_reward(
        ["p"] * 2,
        ["\\boxed{ para}", " para"],
        continuation=[CONT] * 2,
        boundaries=[BOUNDS] * 2,
        format=["v0", "continuation"],
        reward="first-token",
    )
    assert out == [1.0, 1.0]
    with pytest.raises(ValueError, match="one continuation"):
        rpt_reward(["p"], ["x"], continuation=[], boundaries=[])
    assert rpt_reward.__name__ == "rpt"


def test_completion_text():
    assert completion_text("plain") == "plain"
    assert completion_text([{"role": "assistant", "content": "a"}, {"role": "user", "content": "u"}]) == "a"
    assert (
        completion_text(
            [
                {
                    "role": "assistant",
                    "content": [{"type": "text", "text": "a"}, {"type": "image"}, {"type": "text", "text": "b"}],
                }
            ]
        )
        == "ab"
    )
    assert completion_text([{"role": "user", "content": "u"}]) == ""


@pytest.mark.parametrize("fmt_name", ["v0", "continuation"])
def test_verl_row_keys(fmt_name):
    fmt = PROMPT_FORMATS[fmt_name]
    row = task_to_verl_row(TASKS[0], fmt)
    assert set(row) == {"data_source", "prompt", "ability", "reward_model", "extra_info"}
    assert row["data_source"] == "rpt" and row["ability"] == "next-token-prediction"
    assert row["reward_model"]["style"] == "rule"
    assert json.loads(row["reward_model"]["ground_truth"]) == {
        "continuation": CONT,
        "boundaries": BOUNDS,
        "reward": "prefix",
        "format": fmt_name,
    }
    info = row["extra_info"]
    assert {k: info[k] for k in ("task_id", "doc_id", "pos", "entropy", "band")} == {
        "task_id": "d0:4",
        "doc_id": "d0",
        "pos": 4,
        "entropy": 1.25,
        "band": "medium",
    }
    (message,) = row["prompt"]
    assert message["role"] == "user" and TASKS[0]["context"] in message["content"]
    if fmt_name == "continuation":
        assert info["raw_prompt"] is True
        assert message["content"] == info["prompt_text"] == TASKS[0]["context"]
    else:
        assert info["raw_prompt"] is False and "prompt_text" not in info
        assert message["content"].startswith("### Context\n")


@pytest.mark.parametrize("fmt_name", ["v0", "continuation"])
def test_trl_row_keys(fmt_name):
    fmt = PROMPT_FORMATS[fmt_name]
    row = task_to_trl_row(TASKS[0], fmt, reward="first-token")
    assert set(row) == {"prompt", "continuation", "boundaries", "reward", "format", "task_id"}
    assert (row["continuation"], row["boundaries"], row["reward"], row["format"], row["task_id"]) == (
        CONT,
        BOUNDS,
        "first-token",
        fmt_name,
        "d0:4",
    )
    if fmt_name == "continuation":
        assert row["prompt"] == TASKS[0]["context"]
    else:
        assert row["prompt"][-1]["role"] == "user" and TASKS[0]["context"] in row["prompt"][-1]["content"]


def test_row_builders_reject_unknown_reward():
    for build in (task_to_verl_row, task_to_trl_row):
        with pytest.raises(ValueError, match="reward 'dense' needs the policy's probability"):
            build(TASKS[0], PROMPT_FORMATS["v0"], reward="dense")


def _load_parquet(rows, tmp_path, name):
    path = tmp_path / f"{name}.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return datasets.load_dataset("parquet", data_files=str(path), split="train", cache_dir=str(tmp_path / "cache"))


@pytest.mark.parametrize("fmt_name", ["v2", "continuation"])
def test_parquet_round_trip_then_score(tmp_path, fmt_name):
    fmt = PROMPT_FORMATS[fmt_name]
    # One right and one wrong completion per task, in the format's answer style.
    answers = [(" paragraph", " parag"), (" =é", " =\u00e9x")]
    wrap = (lambda a: a) if fmt_name == "continuation" else (lambda a: f"<think>...</think> \\boxed{{{a}}}")
    completions = [wrap(right) for right, _ in answers] + [wrap(wrong) for _, wrong in answers]

    verl_ds = _load_parquet([task_to_verl_row(t, fmt) for t in TASKS], tmp_path, "verl")
    assert verl_ds[0]["prompt"][0]["role"] == "user"
    scores = [
        compute_score(row["data_source"], completion, row["reward_model"]["ground_truth"], row["extra_info"])
        for row, completion in zip(list(verl_ds) * 2, completions)
    ]
    assert scores == [1.0, 1.0, 0.0, 0.0]

    trl_ds = _load_parquet([task_to_trl_row(t, fmt) for t in TASKS], tmp_path, "trl")
    batch = trl_ds[:]
    columns = {k: batch[k] * 2 for k in ("continuation", "boundaries", "reward", "format", "task_id")}
    assert rpt_reward(batch["prompt"] * 2, completions, **columns) == [1.0, 1.0, 0.0, 0.0]


def test_prompt_text_with_tokenizer():
    class FakeTokenizer:
        chat_template = "fake"

        def apply_chat_template(self, messages, add_generation_prompt, tokenize):
            return "|".join(m["content"] for m in messages) + "|assistant:"

    row = task_to_verl_row(TASKS[0], PROMPT_FORMATS["v0"], tokenizer=FakeTokenizer())
    assert row["extra_info"]["prompt_text"].endswith("|assistant:")
    row = task_to_trl_row(TASKS[0], PROMPT_FORMATS["v0"], tokenizer=FakeTokenizer())
    assert row["prompt_text"].endswith("|assistant:")
