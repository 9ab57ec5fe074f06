"""Sentence, masked-sentence and span tasks (`rpt make-tasks --unit`, rptdata/tasks/units.py): the
splitter's and the span picker's properties, the stage on real corpora (the Omni-MATH stand-in and
builtin:champ) with every task checked against the document's bytes, accounting, and a tasks
directory written by the code before units, read unchanged.

Run: .venv/bin/python -m pytest -q tests/test_units.py
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from cli.main import cli
from rptdata.errors import BadOption
from rptdata.io import read_manifest
from rptdata.tasks import MakeTasksConfig
from rptdata.tasks.units import (
    UNIT_SKIP_REASONS,
    byte_offsets,
    covered_tokens,
    math_spans,
    occurrences,
    paragraph_spans,
    pick_spans,
    sentence_spans,
    target_boundaries,
    word_spans,
)
from rpttrain.data import TaskRows, iter_tasks, load_tasks
from tests.conftest import OMNIMATH

OLD_TASKS = Path(__file__).parent / "data" / "tasks-before-units"

# ---------------------------------------------------------------------------------------------
# pure helpers

_PIECES = st.sampled_from(
    [
        "Let ",
        "$x = 1.5$",
        ". ",
        "e.g. ",
        "i.e. ",
        "1. ",
        "(a) ",
        "\\[ y. z \\]",
        "\n\n",
        "\n",
        "Then ",
        "naïve ",
        "世界。",
    ]
)


@settings(max_examples=150, deadline=None)
@given(st.lists(_PIECES, max_size=30).map("".join))
def test_sentences_cover_the_text_and_never_cut_math(text):
    spans = sentence_spans(text)
    assert "".join(text[a:b] for a, b in spans) == text
    assert all(a < b for a, b in spans)
    maths = math_spans(text)
    for a, _ in spans[1:]:
        assert not any(m0 < a < m1 for m0, m1 in maths), (text, a)


def test_sentences_split_after_blank_lines_and_keep_decimals():
    text = "We have $x = 1.5$ and e.g. two cases. Then it holds.\n\n### Part 2\nDone."
    got = [text[a:b] for a, b in sentence_spans(text)]
    assert got == ["We have $x = 1.5$ and e.g. two cases. ", "Then it holds.\n\n", "### Part 2\nDone."]


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.sampled_from(["the", "cat", "saw", "a", "dog", "x", "2", "naïve", "世界"]), min_size=1, max_size=25),
    st.integers(1, 4),
    st.integers(1, 3),
    st.integers(0, 2**31),
)
def test_picked_spans_occur_once_and_do_not_overlap(words, max_words, slots, seed):
    text = " ".join(words)
    para = text.encode()
    spans = word_spans(text)
    offs = byte_offsets(text, [x for s in spans for x in s])
    wb = [(offs[2 * i], offs[2 * i + 1]) for i in range(len(spans))]
    rng = np.random.default_rng(seed)
    got = pick_spans(para, wb, list(rng.permutation(len(wb))), slots, max_words, rng)
    assert len(got) == slots
    taken = [g for g in got if g is not None]
    for first, last in taken:
        assert 1 <= last - first + 1 <= max_words
        assert occurrences(para, para[wb[first][0] : wb[last][1]]) == 1
    for i, a in enumerate(taken):
        for b in taken[i + 1 :]:
            assert a[1] < b[0] or b[1] < a[0]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 5), min_size=1, max_size=20), st.data())
def test_boundaries_are_token_ends_inside_the_target(lengths, data):
    ends = np.cumsum(lengths)
    start = data.draw(st.integers(0, int(ends[-1]) - 1))
    end = data.draw(st.integers(start + 1, int(ends[-1])))
    b = target_boundaries(ends, start, end)
    assert b == sorted(set(b)) and b[-1] == end - start and b[0] > 0
    assert set(b[:-1]) <= {int(e) - start for e in ends}
    first, last = covered_tokens(ends, start, end)
    starts = np.concatenate([[0], ends[:-1]])
    assert starts[first] <= start < ends[first] and starts[last] < end <= ends[last]


def test_paragraphs_and_words():
    text = "A b.\n\n\nC-d e's f\n \ng"
    assert [text[a:b] for a, b in paragraph_spans(text)] == ["A b.", "C-d e's f", "g"]
    assert [text[a:b] for a, b in word_spans(text)] == ["A", "b", "C-d", "e's", "f", "g"]


def test_unit_options_are_refused_where_they_do_not_fit(tmp_path):
    with pytest.raises(BadOption, match="--masked is for --unit sentence"):
        MakeTasksConfig(scored_dir="s", out="o", unit="token", masked=True)
    with pytest.raises(BadOption, match="always masked"):
        MakeTasksConfig(scored_dir="s", out="o", unit="span", masked=True)
    with pytest.raises(BadOption, match="--min-live"):
        MakeTasksConfig(scored_dir="s", out="o", unit="sentence", min_live=0.1)
    with pytest.raises(BadOption, match="--span-words must be at least 1"):
        MakeTasksConfig(scored_dir="s", out="o", unit="span", span_words=0)
    # a token run's identity is what it was before units: an old run resumes under the new code
    old = MakeTasksConfig(scored_dir="s", out="o").identity()
    assert "unit" not in old and "span_words" not in old and "continuation_tokens" in old


# ---------------------------------------------------------------------------------------------
# the stage, through the CLI, on real corpora scored by a tiny model with the embedded tokenizer


def run(*args) -> str:
    r = CliRunner().invoke(cli, [str(a) for a in args])
    assert r.exit_code == 0, r.output + repr(r.exception)
    return r.output


@pytest.fixture(scope="module")
def scorer(tmp_path_factory, smollm2_tokenizer):
    """A tiny random Llama over the embedded model's tokenizer: scores fast, and its tasks train
    with smollm2-135m (same vocabulary)."""
    from tests.rpt_fixtures import tiny_llama

    root = tmp_path_factory.mktemp("units-model")
    smollm2_tokenizer.save_pretrained(root / "tok")
    return tiny_llama(root / "model", root / "tok")


@pytest.fixture(scope="module", params=["omni", "champ"])
def scored(request, tmp_path_factory, scorer):
    root = tmp_path_factory.mktemp(f"units-{request.param}")
    if request.param == "omni":
        corpus = root / "omni.jsonl"
        with open(OMNIMATH, encoding="utf-8") as f:
            corpus.write_text("".join(next(f) for _ in range(6)), encoding="utf-8")
        run("prepare", corpus, "--template", "{problem}\\n\\n{solution}", "--out", root / "prep", "--shard-docs", 3,
            "--tokenizer", "smollm2-135m", "--no-progress")  # fmt: skip
    else:
        run("prepare", "builtin:champ", "--max-docs", 6, "--out", root / "prep", "--shard-docs", 3,
            "--tokenizer", "smollm2-135m", "--no-progress")  # fmt: skip
    run("score-entropy", root / "prep", "--out", root / "scored", "--model", scorer, "--keep-all", "--max-context", 128,
        "--engine", "hf", "--dtype", "float32", "--device", "cpu", "--no-progress")  # fmt: skip
    return root


def _docs(prep: Path) -> dict[str, bytes]:
    out = {}
    for path in sorted((prep / "docs").glob("part-*.parquet")):
        for row in pq.read_table(path, columns=["doc_id", "text"]).to_pylist():
            out[row["doc_id"]] = row["text"].encode()
    return out


@pytest.mark.parametrize(
    "unit",
    [["sentence"], ["sentence", "--masked"], ["span"], ["span", "--span-select", "entropy", "--span-words", "2"]],
)
def test_unit_tasks_are_the_documents_bytes(scored, unit, tmp_path):
    out = tmp_path / "tasks"
    text = run("make-tasks", scored / "scored", "--out", out, "--unit", *unit, "--threshold", 0, "--context-tokens", 64,
               "--eval-fraction", 0.3, "--no-progress")  # fmt: skip
    m = read_manifest(out, "make-tasks")
    name = "masked-sentence" if "--masked" in unit else unit[0]
    assert m["unit"] == name and f"--unit {name}" in text
    c = m["counts"]
    assert c["candidates_in"] == sum(c["tasks"].values()) + sum(c["skipped"].values())
    assert set(c["skipped"]) == set(UNIT_SKIP_REASONS)
    docs = _docs(scored / "prep")
    tasks = [t for split in ("train", "eval") for t in iter_tasks(out, split)]
    assert sum(c["tasks"].values()) == len(tasks) > 0
    for t in tasks:
        doc = docs[t["doc_id"]]
        ctx, target = t["context"].encode(), t["continuation"].encode()
        after = (t["context_after"] or "").encode()
        start = t["start_byte"]
        assert t["unit"] == name and target.strip()
        # context + target (+ context_after) are consecutive bytes of the document, none changed
        assert doc[start - len(ctx) : start + len(target) + len(after)] == ctx + target + after
        assert t["boundaries"][-1] == len(target)
        assert t["band"] and t["entropy"] is not None and t["scored_tokens"] >= 1
        if name == "masked-sentence":
            assert after  # the next sentence
        elif name == "sentence":
            assert t["context_after"] is None
        if name == "span":
            paragraph = next(doc[a:b] for a, b in _byte_paragraphs(doc) if a <= start and start + len(target) <= b)
            assert occurrences(paragraph, target) == 1 and 1 <= len(word_spans(t["continuation"])) <= 3
    # the training reader carries the unit's columns
    if c["tasks"]["train"]:
        row = TaskRows(out, tmp_path / "cache").take([0])[0]
        assert row["unit"] == name and "context_after" in row


def _byte_paragraphs(doc: bytes):
    text = doc.decode()
    for a, b in paragraph_spans(text):
        yield tuple(byte_offsets(text, [a, b]))


def test_span_selection_is_seeded(scored, tmp_path):
    def ids(seed, name):
        run("make-tasks", scored / "scored", "--out", tmp_path / name, "--unit", "span", "--threshold", 0,
            "--seed", seed, "--spans-per-paragraph", 2, "--no-progress")  # fmt: skip
        return [t["task_id"] for s in ("train", "eval") for t in iter_tasks(tmp_path / name, s)]

    assert ids(3, "a") == ids(3, "b") != ids(4, "c")


def test_old_tasks_directory_reads_unchanged(tmp_path):
    """A tasks directory written by `rpt make-tasks` before units (tests/data/tasks-before-units):
    no unit columns, no `unit` in its manifest. It reads as token tasks, and verifies."""
    old = tmp_path / "old"
    shutil.copytree(OLD_TASKS, old)
    manifest = json.loads((old / "manifest.json").read_text())
    assert "unit" not in manifest and "unit" not in pq.read_schema(old / "train" / "part-00000.parquet").names
    tasks = load_tasks(old, "train")
    assert len(tasks) == manifest["counts"]["tasks"]["train"] == 8
    assert all(t["context"] and t["continuation"] and "unit" not in t for t in tasks)
    rows = TaskRows(old, tmp_path / "cache").take([0, 1])
    assert [r["task_id"] for r in rows] == [t["task_id"] for t in tasks[:2]]
    run("verify", old)
