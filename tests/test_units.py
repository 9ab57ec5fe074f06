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


_SCORED: dict[str, Path] = {}


def _scored(name: str, tmp_path_factory, scorer) -> Path:
    """PREP and SCORED of 6 documents of a real corpus (once per module and corpus)."""
    if name in _SCORED:
        return _SCORED[name]
    root = tmp_path_factory.mktemp(f"units-{name}")
    if name == "omni":
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
    _SCORED[name] = root
    return root


@pytest.fixture(scope="module", params=["omni", "champ"])
def scored(request, tmp_path_factory, scorer):
    return _scored(request.param, tmp_path_factory, scorer)


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
    scores = {}
    for path in sorted((scored / "scored" / "positions").glob("part-*.parquet")):
        for p in pq.read_table(path, columns=["doc_id", "pos", "token_id", "entropy", "target_logprob"]).to_pylist():
            scores[(p["doc_id"], p["pos"])] = p
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
        # the difficulty and the first token come from the scored position the target starts in
        first = scores[(t["doc_id"], t["pos"])]
        assert t["target_id"] == first["token_id"] and t["target_logprob"] == pytest.approx(first["target_logprob"])
        assert t["entropy_first"] == pytest.approx(first["entropy"])
        assert t["entropy"] == pytest.approx(t["entropy_mean"])  # --unit-entropy mean
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


# ---------------------------------------------------------------------------------------------
# rewards, prompts and the fit of both to a unit

_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)


@settings(max_examples=300, deadline=None)
@given(_TEXT, st.sampled_from([" ", "\n", "\t", "  \n "]))
def test_exact_reward_reads_through_whitespace_and_normal_forms(target, space):
    import unicodedata

    from rpttrain.reward import exact_nocase_reward, exact_reward, normalize_text

    has_text = bool(normalize_text(target))
    respaced = space + space.join(target.split()) + space
    assert exact_reward(target, target) == exact_reward(respaced, target) == float(has_text)
    assert exact_reward(unicodedata.normalize("NFD", target), target) == float(has_text)
    assert exact_nocase_reward(target.swapcase(), target) == float(has_text)
    if target.swapcase().casefold() != target.casefold() or not has_text:
        return
    # case is kept unless asked: a changed letter fails the plain exact match
    assert exact_reward(target.swapcase(), target) == float(normalize_text(target.swapcase()) == normalize_text(target))
    assert exact_reward(target + "x", target) == 0.0 and exact_reward(None, target) == 0.0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 4), min_size=1, max_size=12), st.data())
def test_prefix_reward_on_a_sentence_accepts_exactly_its_token_prefixes(lengths, data):
    from rpttrain.reward import prefix_reward

    text = "".join(chr(ord("a") + i % 26) * n for i, n in enumerate(lengths))
    ends = np.cumsum(lengths)
    start = data.draw(st.integers(0, int(ends[-1]) - 1))
    end = data.draw(st.integers(start + 1, int(ends[-1])))
    target, b = text[start:end], target_boundaries(ends, start, end)
    for n in range(len(target) + 1):
        assert prefix_reward(target[:n], target, b) == float(n in b)


def test_masked_formats_show_both_sides_and_box_the_answer(smollm2_tokenizer):
    from rpttrain.prompts import PROMPT_FORMATS, load_prompt_format, render_prompt, task_prompt_ids

    for name in ("masked-sentence", "masked-span"):
        fmt = PROMPT_FORMATS[name]
        text = render_prompt(fmt, "Before {context_after} $\\frac{a}{b}$ ", None, " after.")
        assert "Before {context_after} $\\frac{a}{b}$ [MASK] after." in text and "\\boxed{}" in text
        assert fmt.masked and fmt.extract("so \\boxed{the cat}") == "the cat"
    assert "\\boxed{}" in render_prompt(PROMPT_FORMATS["sentence"], "x") and not PROMPT_FORMATS["sentence"].masked
    # a long context loses its start; the text after the mask stays whole
    task = {"context": "word " * 400, "context_after": " the end of it all."}
    ids = task_prompt_ids(PROMPT_FORMATS["masked-span"], task, smollm2_tokenizer, 250)
    shown = smollm2_tokenizer.decode(ids)
    assert len(ids) <= 250 and "[MASK] the end of it all." in shown and shown.count("word") < 400
    # with no context left, the text after the mask loses its end
    task = {"context": "zebra " * 50, "context_after": " tail" * 400}
    shown = smollm2_tokenizer.decode(task_prompt_ids(PROMPT_FORMATS["masked-span"], task, smollm2_tokenizer, 250))
    assert "[MASK] tail tail" in shown and "zebra" not in shown and shown.count("tail") < 400
    with pytest.raises(BadOption, match="alone is longer"):
        task_prompt_ids(PROMPT_FORMATS["masked-span"], task, smollm2_tokenizer, 20)
    with pytest.raises(BadOption, match="at most once"):
        load_prompt_format(str(_template("{context}{context_after}{context_after}")))


def _template(text: str) -> Path:
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="rpt-template-")) / "template.txt"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("unit", "reward", "template", "error"),
    [
        ("span", "exact", "masked-span", None),
        ("span", "exact-nocase", None, None),
        ("span", "prefix", "masked-span", "--reward prefix does not fit span tasks"),
        ("masked-sentence", "first-token", None, "use --reward exact, exact-nocase or judge"),
        ("span", "judge", "masked-span", None),
        ("sentence", "prefix", "sentence", None),
        ("sentence", "exact", "v0", "--prompt-template v0 does not fit sentence tasks"),
        ("sentence", "exact", "masked-sentence", "does not fit sentence tasks"),
        ("masked-sentence", "exact", "masked-span", "use masked-sentence"),
        ("token", "exact", "v0", "--reward exact does not fit token tasks"),
        ("token", "prefix", "masked-span", "does not fit token tasks"),
        ("span", "math", None, "checks final answers"),
    ],
)
def test_rewards_and_formats_are_refused_where_the_unit_does_not_fit(unit, reward, template, error):
    from rpttrain.data import check_task_fit

    manifest = {"stage": "make-tasks"} if unit == "token" else {"stage": "make-tasks", "unit": unit}
    if error is None:
        check_task_fit(manifest, reward, template)
    else:
        with pytest.raises(BadOption, match=error):
            check_task_fit(manifest, reward, template)


def test_a_template_file_must_match_the_unit():
    from rpttrain.data import check_task_fit

    plain, masked = _template("Go on: {context}"), _template("{context}[MASK]{context_after}")
    check_task_fit({"unit": "span"}, "exact", str(masked))
    check_task_fit({"unit": "sentence"}, "exact", str(plain))
    with pytest.raises(BadOption, match="holds \\{context_after\\}"):
        check_task_fit({"unit": "span"}, "exact", str(plain))
    with pytest.raises(BadOption, match="has no \\{context_after\\}"):
        check_task_fit({"unit": "sentence"}, "exact", str(masked))


def test_the_reward_functions_of_trl_and_verl_score_exact():
    from rpttrain.integrations.trl import rpt_reward
    from rpttrain.integrations.verl import compute_score, task_to_verl_row
    from rpttrain.prompts import PROMPT_FORMATS

    task = {"task_id": "d@span:4", "doc_id": "d", "pos": 1, "context": "The ", "continuation": "big cat",
            "context_after": " sat.", "boundaries": [3, 7], "entropy": 1.2, "band": "medium"}  # fmt: skip
    row = task_to_verl_row(task, PROMPT_FORMATS["masked-span"], reward="exact")
    assert "The [MASK] sat." in row["prompt"][0]["content"]
    gt = row["reward_model"]["ground_truth"]
    assert compute_score("x", "so \\boxed{big  cat}", gt) == 1.0 and compute_score("x", "\\boxed{big}", gt) == 0.0
    got = rpt_reward(["p", "p"], ["\\boxed{Big cat}", "\\boxed{big cat}"], ["big cat"] * 2, [[3, 7]] * 2,
                     reward=["exact"] * 2, format=["masked-span"] * 2)  # fmt: skip
    assert got == [0.0, 1.0]


# ---------------------------------------------------------------------------------------------
# through the CLI: tasks of each unit from the Omni-MATH stand-in, one GRPO step of the embedded
# model with --reward exact, then rpt eval with its per-band intervals


@pytest.mark.parametrize(
    ("unit", "template", "reward"),
    [
        pytest.param(["sentence"], "sentence", "exact", marks=pytest.mark.long),
        pytest.param(["sentence", "--masked"], "masked-sentence", "exact", marks=pytest.mark.long),
        # all three in `make test-long` (CI's 30 min): tests/test_judge.py trains and evaluates sentence
        # tasks through the CLI in `make test`. (They failed once in a full run on a shared machine with
        # "the training split is empty" and have not failed since, alone or in the whole file.)
        pytest.param(["span"], "masked-span", "exact-nocase", marks=pytest.mark.long),
    ],
)
def test_train_and_eval_each_unit_with_the_exact_reward(unit, template, reward, tmp_path, tmp_path_factory, scorer):
    root = _scored("omni", tmp_path_factory, scorer)
    tasks, runs, report = tmp_path / "tasks", tmp_path / "run", tmp_path / "eval"
    run("make-tasks", root / "scored", "--out", tasks, "--unit", *unit, "--threshold", 0, "--context-tokens", 32,
        "--context-after-tokens", 32, "--eval-fraction", 0.5, "--max-tasks", 4, "--max-eval-tasks", 3,
        "--no-progress")  # fmt: skip
    out = run("train", tasks, "--out", runs, "--model", "smollm2-135m", "--steps", 1, "--batch-size", 2,
              "--group-size", 2, "--max-new-tokens", 8, "--max-prompt-tokens", 256, "--prompt-template", template,
              "--reward", reward, "--device", "cpu", "--dynamic-sampling-from", -1, "--save-every", 1)  # fmt: skip
    metrics = [json.loads(line) for line in (runs / "metrics.jsonl").read_text().splitlines()]
    assert metrics and metrics[-1]["step"] == 1 and "reward_mean" in metrics[-1], out
    run("eval", tasks, "--checkpoints", runs, "--mode", "reasoning", "--reward", reward, "--limit", 2,
        "--max-new-tokens", 8, "--max-prompt-tokens", 256, "--device", "cpu", "--out", report)  # fmt: skip
    rep = json.loads((report / "report.json").read_text())
    name = read_manifest(tasks, "make-tasks")["unit"]
    assert rep["unit"] == name and {r["unit"] for r in rep["rows"]} == {name}
    assert {r["step"] for r in rep["rows"]} == {0, 1} and {r["prompt_template"] for r in rep["rows"]} == {template}
    for r in rep["rows"]:
        cell = r["bands"]["all"]
        assert cell["n"] == 2 and 0 <= cell["ci_low"] <= cell["accuracy"] <= cell["ci_high"] <= 1
    assert f"reasoning, {name}" in (report / "report.md").read_text()


def test_units_refuse_what_cannot_serve_them(tmp_path, tmp_path_factory, scorer):
    root = _scored("omni", tmp_path_factory, scorer)
    tasks = tmp_path / "spans"
    run("make-tasks", root / "scored", "--out", tasks, "--unit", "span", "--threshold", 0, "--no-progress")
    r = CliRunner().invoke(cli, ["eval", str(tasks), "--reward", "exact", "--out", str(tmp_path / "e")])
    assert r.exit_code != 0 and "evaluate them with --mode reasoning" in r.output
    r = CliRunner().invoke(cli, ["train", str(tasks), "--out", str(tmp_path / "r"), "--reward", "prefix",
                                 "--prompt-template", "masked-span"])  # fmt: skip
    assert r.exit_code != 0 and "--reward prefix does not fit span tasks" in r.output
    r = CliRunner().invoke(cli, ["train", str(tasks), "--out", str(tmp_path / "t"), "--backend", "trl",
                                 "--reward", "exact", "--prompt-template", "masked-span"])  # fmt: skip
    assert r.exit_code != 0 and "context_after" in r.output
