"""`rpt prepare`: outputs, accounting, bad input, resume, rerun refusal, CLI."""

from __future__ import annotations

import gzip
import json

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from cli.main import cli
from rptdata import prepare as prepare_mod
from rptdata.errors import BadInput, ManifestMismatch
from rptdata.io import list_shards, read_manifest
from rptdata.prepare import PrepareConfig, run_prepare
from tests.conftest import OMNIMATH


def read_docs(out):
    rows = []
    for shard in list_shards(out / "docs"):
        rows += pq.read_table(shard).to_pylist()
    return rows


def check_spans(rows):
    for r in rows:
        raw = r["text"].encode("utf-8")
        assert len(r["token_ids"]) == len(r["token_end_bytes"]) == r["n_tokens"]
        assert r["token_end_bytes"][-1] == len(raw)
        assert all(b > a for a, b in zip([0] + r["token_end_bytes"], r["token_end_bytes"]))


def test_prepare_jsonl_template_and_schema(tmp_path, write_jsonl):
    src = write_jsonl(
        "c.jsonl", [{"problem": f"Problem {i}: 世界 {{x}}", "solution": f"Answer {i} 🎉"} for i in range(25)]
    )
    m = run_prepare(
        PrepareConfig(
            inputs=(str(src),),
            out=str(tmp_path / "p"),
            template=r"{problem}\n\n{solution}",
            shard_docs=10,
            progress=False,
        )
    )
    rows = read_docs(tmp_path / "p")
    assert len(rows) == 25 and len(m["shards"]) == 3
    assert rows[0]["text"] == "Problem 0: 世界 {x}\n\nAnswer 0 🎉"
    assert rows[3]["doc_id"] == f"{src}#4"  # 1-based line number
    assert m["counts"]["tokens"] == sum(r["n_tokens"] for r in rows)
    assert m["counts"]["documents_read"] == m["counts"]["documents_written"] == 25
    assert (
        str(pq.read_schema(list_shards(tmp_path / "p" / "docs")[0]).field("token_ids").type) == "list<element: int32>"
    )
    check_spans(rows)


def test_all_input_kinds_and_dedupe(tmp_path, write_jsonl):
    import pyarrow as pa

    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text("a plain text document\r\nwith CRLF")
    (folder / "b.md").write_text("# Title\n\nsame text")
    (folder / "c.json").write_text(json.dumps([{"text": "from json"}, {"text": "same text"}]))
    pq.write_table(pa.table({"text": ["from parquet", "", "same text"]}), folder / "d.parquet")
    with gzip.open(folder / "e.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": "from gzip"}) + "\n\n")  # a blank line is not a record
    m = run_prepare(PrepareConfig(inputs=(str(folder),), out=str(tmp_path / "p"), dedupe=True, progress=False))
    c = m["counts"]
    assert c["documents_read"] == 8
    assert c["documents_dropped"] == {"duplicate": 1, "empty": 1}
    assert c["documents_written"] == 6
    texts = [r["text"] for r in read_docs(tmp_path / "p")]
    assert "a plain text document\r\nwith CRLF" in texts and "from gzip" in texts and "from parquet" in texts


@pytest.mark.parametrize(
    "raw, reason",
    [
        (b'{"text": "ok"', "malformed json"),
        (b'{"body": "x"}', "missing field"),
        (b'{"text": "caf\xe9"}', "invalid utf8"),
        (b'{"text": "\\ud800"}', "invalid unicode"),
        (b'["a list"]', "not an object"),
    ],
)
def test_bad_input_names_file_and_line(tmp_path, write_jsonl, raw, reason):
    src = write_jsonl("bad.jsonl", [{"text": "good one"}, {"text": "good two"}], raw_lines=[raw])
    with pytest.raises(BadInput) as err:
        run_prepare(PrepareConfig(inputs=(str(src),), out=str(tmp_path / "p"), progress=False))
    assert f"{src}, line 3" in str(err.value) and reason in str(err.value)


def test_skip_bad_counts_and_logs_rejects(tmp_path, write_jsonl):
    src = write_jsonl(
        "bad.jsonl",
        [{"text": "good"}],
        raw_lines=[b"{oops", b'{"text": "\xff"}', b'{"text": "ctl \\u0016 char"}', b'{"t": 1}'],
    )
    m = run_prepare(PrepareConfig(inputs=(str(src),), out=str(tmp_path / "p"), skip_bad=True, progress=False))
    c = m["counts"]
    assert c["documents_read"] == 5 and c["documents_written"] == 1
    # \x16 has no token in SmolLM2's vocabulary: exact spans are impossible, so it is rejected
    assert c["documents_rejected"] == {"invalid_utf8": 1, "malformed_json": 1, "missing_field": 1, "untokenizable": 1}
    rejects = [json.loads(x) for x in (tmp_path / "p" / "rejects.jsonl").read_text().splitlines()]
    assert sorted(r["doc_id"] for r in rejects) == [f"{src}#{i}" for i in (2, 3, 4, 5)]


def test_resume_after_crash_gives_identical_output(tmp_path, write_jsonl, monkeypatch):
    src = write_jsonl("c.jsonl", [{"text": f"document number {i} " * (i % 7 + 1)} for i in range(50)])
    cfg = dict(inputs=(str(src),), shard_docs=8, progress=False)
    whole = run_prepare(PrepareConfig(out=str(tmp_path / "whole"), **cfg))

    real_write, calls = prepare_mod._prepare_unit, []

    def crash_after_two(*args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated kill")
        calls.append(1)
        return real_write(*args, **kwargs)

    monkeypatch.setattr(prepare_mod, "_prepare_unit", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        run_prepare(PrepareConfig(out=str(tmp_path / "crash"), **cfg))
    assert len(list_shards(tmp_path / "crash" / "docs")) == 2
    assert not (tmp_path / "crash" / "manifest.json").exists()

    written = []
    monkeypatch.setattr(
        prepare_mod,
        "_prepare_unit",
        lambda stage, index, *a, **k: written.append(index) or real_write(stage, index, *a, **k),
    )
    resumed = run_prepare(PrepareConfig(out=str(tmp_path / "crash"), **cfg))
    assert written == [2, 3, 4, 5, 6]  # the two finished shards were not redone
    assert read_docs(tmp_path / "crash") == read_docs(tmp_path / "whole")
    assert resumed["counts"] == whole["counts"] and resumed["shards"] == whole["shards"]


# ---------------------------------------------------------------------------------------------
# several workers


@pytest.fixture
def mixed_corpus(tmp_path, write_jsonl):
    """Files of every kind, one large .jsonl (with blank lines) and its gzip copy, bad records,
    empty and duplicate texts: shards cut through files and files through shards."""
    import pyarrow as pa

    folder = tmp_path / "corpus"
    folder.mkdir()
    lines = []
    for i in range(60):
        lines.append(json.dumps({"text": f"record {i}: " + "théorème " * (i % 5) + "🎉" * (i % 3)}).encode())
        if i % 11 == 0:
            lines.append(b"   ")  # blank lines are not records but keep line numbers honest
        if i % 17 == 0:
            lines.append(b"{broken")
        if i % 13 == 0:
            lines.append(json.dumps({"text": "  "}).encode())  # empty after strip: dropped
    (folder / "a.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    with gzip.open(folder / "b.jsonl.gz", "wb") as f:
        f.write(b"\n".join(lines[:40]) + b"\n")
    pq.write_table(pa.table({"text": [f"parquet row {i}" for i in range(23)]}), folder / "c.parquet", row_group_size=5)
    (folder / "d.txt").write_text("a text file, one document")
    (folder / "e.json").write_text(json.dumps([{"text": f"json {i}"} for i in range(7)]))
    return folder


def _as_set(rows):
    return sorted(
        (r["doc_id"], r["source"], r["text"], tuple(r["token_ids"]), tuple(r["token_end_bytes"]), r["n_tokens"])
        for r in rows
    )


def _rejects(out):
    path = out / "rejects.jsonl"
    return sorted(path.read_text().splitlines()) if path.exists() else []


def test_two_workers_equal_one(tmp_path, mixed_corpus, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cfg = dict(inputs=(str(mixed_corpus),), shard_docs=9, skip_bad=True, min_chars=3, progress=False)
    one = run_prepare(PrepareConfig(out=str(tmp_path / "one"), **cfg))
    c = one["counts"]
    assert c["documents_read"] == c["documents_written"] + sum(c["documents_rejected"].values()) + sum(
        c["documents_dropped"].values()
    )
    assert c["documents_rejected"]["malformed_json"] == 6 and c["documents_dropped"]["empty"] == 8

    first = run_prepare(PrepareConfig(out=str(tmp_path / "two"), num_workers=2, worker_index=0, **cfg))
    assert first["complete"] is False and not (tmp_path / "two" / "manifest.json").exists()
    assert first["shards_done"] == (first["shards_total"] + 1) // 2  # shards 0, 2, 4, ...
    two = run_prepare(PrepareConfig(out=str(tmp_path / "two"), num_workers=2, worker_index=1, **cfg))
    assert (tmp_path / "two" / "manifest.json").exists(), "the worker finishing last writes the manifest"
    assert two["counts"] == one["counts"] and two["shards"] == one["shards"]
    assert _as_set(read_docs(tmp_path / "two")) == _as_set(read_docs(tmp_path / "one"))
    assert read_docs(tmp_path / "two") == read_docs(tmp_path / "one"), "shards are named by record range, not by worker"
    assert _rejects(tmp_path / "two") == _rejects(tmp_path / "one") != []
    check_spans(read_docs(tmp_path / "two"))
    # line numbers survive seeking into the middle of a file past blank lines
    ids = {r["doc_id"]: r["text"] for r in read_docs(tmp_path / "two")}
    lines = (mixed_corpus / "a.jsonl").read_bytes().split(b"\n")
    for doc_id, text in ids.items():
        if doc_id.endswith(".jsonl") or ".jsonl#" in doc_id:
            assert json.loads(lines[int(doc_id.rsplit("#", 1)[1]) - 1])["text"] == text


def test_process_pool_equals_one_process(tmp_path, mixed_corpus):
    cfg = dict(inputs=(str(mixed_corpus),), shard_docs=20, skip_bad=True, progress=False)
    one = run_prepare(PrepareConfig(out=str(tmp_path / "one"), **cfg))
    pool = run_prepare(PrepareConfig(out=str(tmp_path / "pool"), processes=2, **cfg))
    assert pool["counts"] == one["counts"]
    assert _as_set(read_docs(tmp_path / "pool")) == _as_set(read_docs(tmp_path / "one"))
    assert _rejects(tmp_path / "pool") == _rejects(tmp_path / "one")


def test_killed_worker_resumes_to_the_same_output(tmp_path, mixed_corpus, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cfg = dict(inputs=(str(mixed_corpus),), shard_docs=9, skip_bad=True, progress=False)
    one = run_prepare(PrepareConfig(out=str(tmp_path / "one"), **cfg))
    out = tmp_path / "two"
    run_prepare(PrepareConfig(out=str(out), num_workers=2, worker_index=0, **cfg))

    real, calls = prepare_mod._prepare_unit, []

    def killed_after_one(stage, index, *a, **k):
        if calls:
            raise KeyboardInterrupt("simulated kill")
        calls.append(index)
        return real(stage, index, *a, **k)

    monkeypatch.setattr(prepare_mod, "_prepare_unit", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        run_prepare(PrepareConfig(out=str(out), num_workers=2, worker_index=1, **cfg))
    assert calls == [1] and not (out / "manifest.json").exists()
    redone = []
    monkeypatch.setattr(
        prepare_mod, "_prepare_unit", lambda stage, index, *a, **k: redone.append(index) or real(stage, index, *a, **k)
    )
    m = run_prepare(PrepareConfig(out=str(out), num_workers=2, worker_index=1, **cfg))
    assert redone and 1 not in redone and all(i % 2 == 1 for i in redone), "only worker 1's unfinished shards"
    assert m["counts"] == one["counts"]
    assert read_docs(out) == read_docs(tmp_path / "one")
    assert _rejects(out) == _rejects(tmp_path / "one")


def test_torchrun_env_and_dedupe_refusal(tmp_path, mixed_corpus, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "2")
    out = tmp_path / "p"
    partial = run_prepare(
        PrepareConfig(inputs=(str(mixed_corpus),), out=str(out), shard_docs=40, skip_bad=True, progress=False)
    )
    assert partial["worker"] == [2, 3] and partial["shards_total"] == 4
    assert [p.name for p in list_shards(out / "docs")] == ["part-00002.parquet"]
    with pytest.raises(ValueError, match="--dedupe needs one process"):
        run_prepare(PrepareConfig(inputs=(str(mixed_corpus),), out=str(tmp_path / "d"), dedupe=True, progress=False))
    with pytest.raises(ValueError, match="--dedupe needs one process"):
        PrepareConfig(inputs=("x",), out="o", dedupe=True, processes=2)
    monkeypatch.delenv("WORLD_SIZE")
    r = CliRunner().invoke(
        cli, ["prepare", str(mixed_corpus), "--out", str(tmp_path / "c"), "--dedupe", "--num-workers", "2"]
    )
    assert r.exit_code == 2 and "--dedupe needs one process" in r.output


def test_dedupe_resume_remembers_finished_shards(tmp_path, write_jsonl, monkeypatch):
    src = write_jsonl("d.jsonl", [{"text": f"doc {i % 6}"} for i in range(30)])
    cfg = dict(inputs=(str(src),), shard_docs=4, dedupe=True, progress=False)
    whole = run_prepare(PrepareConfig(out=str(tmp_path / "whole"), **cfg))
    assert whole["counts"]["documents_written"] == 6 and whole["counts"]["documents_dropped"] == {"duplicate": 24}
    real, calls = prepare_mod._prepare_unit, []

    def crash(*a, **k):
        if len(calls) == 1:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(prepare_mod, "_prepare_unit", crash)
    with pytest.raises(KeyboardInterrupt):
        run_prepare(PrepareConfig(out=str(tmp_path / "r"), **cfg))
    monkeypatch.setattr(prepare_mod, "_prepare_unit", real)
    resumed = run_prepare(PrepareConfig(out=str(tmp_path / "r"), **cfg))
    assert resumed["counts"] == whole["counts"] and read_docs(tmp_path / "r") == read_docs(tmp_path / "whole")


def test_rerun_refuses_other_options_unless_overwrite(tmp_path, write_jsonl):
    src = write_jsonl("c.jsonl", [{"text": "one"}, {"text": "two"}, {"text": "two"}])
    out = str(tmp_path / "p")
    run_prepare(PrepareConfig(inputs=(str(src),), out=out, progress=False))
    again = run_prepare(PrepareConfig(inputs=(str(src),), out=out, progress=False))  # same run: already done
    assert again["counts"]["documents_written"] == 3
    with pytest.raises(ManifestMismatch, match="options.dedupe"):
        run_prepare(PrepareConfig(inputs=(str(src),), out=out, dedupe=True, progress=False))
    m = run_prepare(PrepareConfig(inputs=(str(src),), out=out, dedupe=True, overwrite=True, progress=False))
    assert m["counts"]["documents_written"] == 2
    m = run_prepare(PrepareConfig(inputs=(str(src),), out=out, max_docs=2, overwrite=True, progress=False))
    assert m["counts"]["documents_read"] == m["counts"]["documents_written"] == 2
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(ManifestMismatch, match="not empty"):
        run_prepare(PrepareConfig(inputs=(str(src),), out=str(tmp_path / "foreign"), progress=False))


def test_cli_prepare_builtin_champ(tmp_path):
    out = tmp_path / "champ"
    result = CliRunner().invoke(cli, ["prepare", "builtin:champ", "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "270 documents read, 270 written" in result.output
    m = read_manifest(out, "prepare")
    rows = read_docs(out)
    assert len(rows) == 270 and m["counts"]["tokens"] == sum(r["n_tokens"] for r in rows) > 50_000
    assert rows[0]["doc_id"].startswith("builtin:champ#") and "\n\n" in rows[0]["text"]
    check_spans(rows)


def test_cli_errors_are_messages_not_tracebacks(tmp_path, write_jsonl):
    src = write_jsonl("bad.jsonl", [], raw_lines=[b"{nope"])
    r = CliRunner().invoke(cli, ["prepare", str(src), "--out", str(tmp_path / "p")])
    assert r.exit_code == 1 and "line 1" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(cli, ["prepare", "nope/missing.jsonl", "--out", str(tmp_path / "q")])
    assert r.exit_code == 1 and "no such file" in r.output
    r = CliRunner().invoke(
        cli, ["prepare", str(src), "--out", str(tmp_path / "q"), "--text-field", "a", "--template", "{b}"]
    )
    assert r.exit_code == 2 and "either --text-field or --template" in r.output


@pytest.mark.slow
@pytest.mark.skipif(not OMNIMATH.exists(), reason="../shared/corpora is not present")
def test_prepare_omnimath(tmp_path):
    m = run_prepare(
        PrepareConfig(
            inputs=(str(OMNIMATH),),
            out=str(tmp_path / "o"),
            template=r"{problem}\n\n{solution}",
            shard_docs=1000,
            progress=False,
        )
    )
    assert m["counts"]["documents_written"] == 2821
    assert m["counts"]["tokens"] == 1_231_196  # ENVIRONMENT.md's count for the same tokenizer and template
    check_spans(read_docs(tmp_path / "o")[:200])


def test_jsonl_reader_reads_every_line_as_json_would(tmp_path):
    """The fast JSON path (orjson) yields what json.loads gives, and leaves what it refuses to json:
    integers over 64 bits, NaN, lone surrogates, a BOM, invalid UTF-8 come out as they always did."""
    from rptdata.sources import TextBuilder, expand_inputs, read_source

    lines = [
        b'{"text": "plain"}',
        b'{"text": 123456789012345678901234567890}',
        b'{"text": NaN}',
        b'{"text": 1.5e300}',
        b'{"text": "lone \\ud800"}',
        b'\xef\xbb\xbf{"text": "bom"}',
        b'{"text": "\xff"}',
        b'{"text": "a", "text": "b"}',
        b"[1, 2]",
        b'{"text": "\\u00e9t\\u00e9 \xf0\x9f\x8e\x89"}',
        b'{"other": 1}',
        b'{"text": -0.0}',
    ]
    path = tmp_path / "t.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    got = [(r.text, r.reject) for r in read_source(expand_inputs([str(path)])[0], TextBuilder())]
    assert got == [
        ("plain", None),
        ("123456789012345678901234567890", None),
        ("nan", None),
        ("1.5e+300", None),
        ("lone \ud800", None),
        (None, "malformed_json"),
        (None, "invalid_utf8"),
        ("b", None),
        (None, "not_an_object"),
        ("été 🎉", None),
        (None, "missing_field"),
        ("-0.0", None),
    ]
