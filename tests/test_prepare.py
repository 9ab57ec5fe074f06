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
from rptdata.manifest import list_shards, read_manifest
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
    src = write_jsonl("c.jsonl", [{"problem": f"Problem {i}: 世界 {{x}}", "solution": f"Answer {i} 🎉"} for i in range(25)])
    m = run_prepare(PrepareConfig(inputs=(str(src),), out=str(tmp_path / "p"), template=r"{problem}\n\n{solution}", shard_docs=10, progress=False))
    rows = read_docs(tmp_path / "p")
    assert len(rows) == 25 and len(m["shards"]) == 3
    assert rows[0]["text"] == "Problem 0: 世界 {x}\n\nAnswer 0 🎉"
    assert rows[3]["doc_id"] == f"{src}#4"  # 1-based line number
    assert m["counts"]["tokens"] == sum(r["n_tokens"] for r in rows)
    assert m["counts"]["documents_read"] == m["counts"]["documents_written"] == 25
    assert str(pq.read_schema(list_shards(tmp_path / "p" / "docs")[0]).field("token_ids").type) == "list<element: int32>"
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
    [(b'{"text": "ok"', "malformed json"), (b'{"body": "x"}', "missing field"), (b'{"text": "caf\xe9"}', "invalid utf8"),
     (b'{"text": "\\ud800"}', "invalid unicode"), (b'["a list"]', "not an object")],
)
def test_bad_input_names_file_and_line(tmp_path, write_jsonl, raw, reason):
    src = write_jsonl("bad.jsonl", [{"text": "good one"}, {"text": "good two"}], raw_lines=[raw])
    with pytest.raises(BadInput) as err:
        run_prepare(PrepareConfig(inputs=(str(src),), out=str(tmp_path / "p"), progress=False))
    assert f"{src}, line 3" in str(err.value) and reason in str(err.value)


def test_skip_bad_counts_and_logs_rejects(tmp_path, write_jsonl):
    src = write_jsonl("bad.jsonl", [{"text": "good"}], raw_lines=[b"{oops", b'{"text": "\xff"}', b'{"text": "ctl \\u0016 char"}', b'{"t": 1}'])
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

    real_write, calls = prepare_mod._write_docs_shard, []

    def crash_after_two(*args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated kill")
        calls.append(1)
        return real_write(*args, **kwargs)

    monkeypatch.setattr(prepare_mod, "_write_docs_shard", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        run_prepare(PrepareConfig(out=str(tmp_path / "crash"), **cfg))
    assert len(list_shards(tmp_path / "crash" / "docs")) == 2
    assert not (tmp_path / "crash" / "manifest.json").exists()

    written = []
    monkeypatch.setattr(prepare_mod, "_write_docs_shard", lambda stage, index, *a, **k: written.append(index) or real_write(stage, index, *a, **k))
    resumed = run_prepare(PrepareConfig(out=str(tmp_path / "crash"), **cfg))
    assert written == [2, 3, 4, 5, 6]  # the two finished shards were not redone
    assert read_docs(tmp_path / "crash") == read_docs(tmp_path / "whole")
    assert resumed["counts"] == whole["counts"] and resumed["shards"] == whole["shards"]


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
    r = CliRunner().invoke(cli, ["prepare", str(src), "--out", str(tmp_path / "q"), "--text-field", "a", "--template", "{b}"])
    assert r.exit_code == 2 and "either --text-field or --template" in r.output


@pytest.mark.slow
@pytest.mark.skipif(not OMNIMATH.exists(), reason="../shared/corpora is not present")
def test_prepare_omnimath(tmp_path):
    m = run_prepare(PrepareConfig(inputs=(str(OMNIMATH),), out=str(tmp_path / "o"), template=r"{problem}\n\n{solution}", shard_docs=1000, progress=False))
    assert m["counts"]["documents_written"] == 2821
    assert m["counts"]["tokens"] == 1_231_196  # ENVIRONMENT.md's count for the same tokenizer and template
    check_spans(read_docs(tmp_path / "o")[:200])
