"""Integrity of what the stages write: markers and manifests record each shard's rows, size and
sha256; consumers refuse a damaged shard naming it and the command that rebuilds it; a producer
rerun redoes only the damaged shards; checkpoints are checked on --resume. The kill-and-rerun
suite is tests/test_faults.py (`make test-faults`).

    .venv/bin/python -m pytest -q tests/test_integrity.py
"""

from __future__ import annotations

import errno
import json

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from cli.main import cli
from rptdata.errors import DamagedFile
from rptdata.io import file_digest, list_shards, read_manifest
from rptdata.prepare import PrepareConfig, run_prepare
from tests.rpt_fixtures import tiny_llama, tiny_train_config, write_tasks_dir

TEXTS = [f"The quick brown fox {i} jumps over the lazy dog {i * 7}." for i in range(12)]


def _prepare(tmp_path, tokenizer, out="prep", **over):
    src = tmp_path / "docs.jsonl"
    if not src.exists():
        src.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    config = dict(inputs=(str(src),), out=str(tmp_path / out), tokenizer=str(tokenizer), shard_docs=4, progress=False)
    config.update(over)
    return run_prepare(PrepareConfig(**config)), tmp_path / out


def _flip_byte(path, at: int | None = None) -> None:
    """Alter one byte in place: same size, other checksum."""
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if at is None else at
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_markers_and_manifest_record_rows_size_and_sha256(tmp_path, tiny_bpe_dir):
    manifest, out = _prepare(tmp_path, tiny_bpe_dir)
    shards = list_shards(out / "docs")
    assert len(shards) == 3
    for shard in shards:
        marker = json.loads((out / "done" / f"docs-{shard.stem.split('-')[1]}.json").read_text())
        assert marker["rows"] == pq.read_metadata(shard).num_rows == 4
        assert {k: marker[k] for k in ("bytes", "sha256")} == file_digest(shard)
        assert manifest["files"][f"docs/{shard.name}"] == {k: marker[k] for k in ("rows", "bytes", "sha256")}


def test_a_damaged_shard_stops_the_consumer_and_a_rerun_redoes_only_it(tmp_path, tiny_bpe_dir):
    from rpttrain.data import load_tasks

    _, prep = _prepare(tmp_path, tiny_bpe_dir)
    shards = list_shards(prep / "docs")
    before = {p.name: (p.stat().st_mtime_ns, file_digest(p)) for p in shards}
    _flip_byte(shards[1])
    # a consumer (make-tasks reads the docs shards the same way) names the file and the command
    from rptdata.io import check_shard

    with pytest.raises(DamagedFile, match=r"docs/part-00001\.parquet: damaged: its sha256 differs.*rerun `rpt prepare"):
        check_shard(prep, "docs/part-00001.parquet", read_manifest(prep))
    shards[2].write_bytes(shards[2].read_bytes()[:100])  # truncated
    with pytest.raises(DamagedFile, match=r"part-00002\.parquet: damaged: 100 bytes, its record says"):
        check_shard(prep, "docs/part-00002.parquet", read_manifest(prep))
    _prepare(tmp_path, tiny_bpe_dir)  # the same command again
    after = {p.name: (p.stat().st_mtime_ns, file_digest(p)) for p in list_shards(prep / "docs")}
    assert after["part-00000.parquet"] == before["part-00000.parquet"]  # untouched
    for name in ("part-00001.parquet", "part-00002.parquet"):  # redone, bit for bit
        assert after[name][1] == before[name][1] and after[name][0] != before[name][0]
    assert all(check_shard(prep, f"docs/{n}", read_manifest(prep)) for n in after)
    # an unparsable shard without a record (an older manifest) is still named
    tasks = write_tasks_dir(tmp_path / "tasks", str(tiny_bpe_dir), [("a b", " c")])
    m = json.loads((tasks / "manifest.json").read_text())
    del m["files"]
    (tasks / "manifest.json").write_text(json.dumps(m))
    (tasks / "train" / "part-00000.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DamagedFile, match=r"train/part-00000\.parquet: damaged, cannot be read as Parquet"):
        load_tasks(tasks, "train")


def test_a_damaged_manifest_or_marker_is_named_then_redone(tmp_path, tiny_bpe_dir):
    manifest, prep = _prepare(tmp_path, tiny_bpe_dir)
    (prep / "manifest.json").write_text('{"stage": "prep')
    with pytest.raises(DamagedFile, match=r"manifest\.json: damaged, not valid JSON"):
        read_manifest(prep)
    (prep / "done" / "docs-00000.json").write_text("{")
    again, _ = _prepare(tmp_path, tiny_bpe_dir)
    assert again["files"] == manifest["files"] and again["counts"] == manifest["counts"]


def test_truncated_task_shard_is_an_error_naming_it_not_a_usage_error(tmp_path, tiny_bpe_dir):
    tasks = write_tasks_dir(tmp_path / "tasks", str(tiny_bpe_dir), [("The quick brown", " fox"), ("The lazy", " dog")])
    model = tiny_llama(tmp_path / "model", tiny_bpe_dir)
    shard = tasks / "train" / "part-00000.parquet"
    shard.write_bytes(shard.read_bytes()[:300])
    r = CliRunner().invoke(
        cli,
        [
            "train",
            str(tasks),
            "--out",
            str(tmp_path / "run"),
            "--model",
            str(model),
            "--steps",
            "1",
            "--batch-size",
            "2",
            "--group-size",
            "2",
            "--max-new-tokens",
            "1",
            "--device",
            "cpu",
            "--prompt-template",
            "continuation",
            "--no-progress",
        ],
    )
    assert r.exit_code == 1, r.output
    assert "Usage:" not in r.output
    assert f"{shard}: damaged: 300 bytes" in r.output and "rerun `rpt make-tasks" in r.output


def test_library_errors_are_not_usage_errors():
    import click
    import pyarrow as pa

    from cli.common import library_errors
    from rptdata.prepare import PrepareConfig

    def raising(error):
        @library_errors
        def command():
            if callable(error):
                error()
            raise error

        return command

    with pytest.raises(click.UsageError):  # a config check: an option problem
        raising(lambda: PrepareConfig(inputs=(), out="x"))()
    for error in (
        pa.ArrowInvalid("Parquet magic bytes not found"),
        json.JSONDecodeError("x", "{", 0),
        OSError(errno.ENOSPC, "No space left on device", "out/docs/part-00000.parquet.tmp-1"),
    ):
        with pytest.raises(click.ClickException) as info:
            raising(error)()
        assert not isinstance(info.value, click.UsageError), error
    assert "part-00000.parquet.tmp-1: No space left on device" in info.value.message


def test_resume_checks_the_checkpoint_files(tmp_path, tiny_bpe_dir):
    from dataclasses import replace

    from rpttrain.checkpoint import list_checkpoints
    from rpttrain.train import run_train

    tasks = write_tasks_dir(tmp_path / "tasks", str(tiny_bpe_dir), [("The quick brown", " fox"), ("The lazy", " dog")])
    model = tiny_llama(tmp_path / "model", tiny_bpe_dir)
    config = tiny_train_config(tasks, model, tmp_path / "run", steps=2, batch_size=2, group_size=2)
    run_train(config)
    first, last = list_checkpoints(tmp_path / "run")
    state = json.loads((last / "state.json").read_text())
    assert {"model.safetensors", "trainer_state.pt", "rng.pt", "config.json"} <= set(state["files"])
    assert state["files"]["trainer_state.pt"] == file_digest(last / "trainer_state.pt")
    assert CliRunner().invoke(cli, ["verify", str(tmp_path / "run")]).exit_code == 0
    _flip_byte(last / "trainer_state.pt")
    r = CliRunner().invoke(cli, ["verify", str(tmp_path / "run")])
    assert r.exit_code == 1 and "step-000002/trainer_state.pt: its sha256 differs" in r.output
    longer = replace(config, steps=3)
    with pytest.raises(
        DamagedFile, match=r"step-000002/trainer_state\.pt: damaged checkpoint file.*resume from step-000001"
    ):
        run_train(longer, resume=True)
    (last / "model.safetensors").write_bytes(b"")
    with pytest.raises(DamagedFile, match=r"model\.safetensors: damaged checkpoint file: 0 bytes"):
        run_train(longer, resume=True)


def test_rpt_verify_names_damaged_files_and_the_rebuild_command(tmp_path, tiny_bpe_dir):
    _, prep = _prepare(tmp_path, tiny_bpe_dir)
    r = CliRunner().invoke(cli, ["verify", str(prep), "--deep"])
    assert r.exit_code == 0 and "rpt prepare output, 7 files checked (deep), none damaged" in r.output, r.output
    _flip_byte(prep / "docs" / "part-00001.parquet")
    marker = prep / "done" / "docs-00002.json"
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "rows": 5}))  # a marker that lies about rows
    r = CliRunner().invoke(cli, ["verify", str(prep)])
    assert r.exit_code == 1
    assert "docs/part-00001.parquet: its sha256 differs" in r.output and "rerun `rpt prepare ... --out" in r.output
    assert "part-00002" in r.output and "marker and the manifest record differ" in r.output
    r = CliRunner().invoke(cli, ["verify", str(prep), "--deep", "--json"])
    problems = [(p["file"].rsplit("/", 1)[1], p["problem"]) for p in json.loads(r.output)["problems"]]
    assert ("part-00002.parquet", "4 rows, its marker says 5") in problems
    _prepare(tmp_path, tiny_bpe_dir)  # the rerun redoes both
    assert CliRunner().invoke(cli, ["verify", str(prep), "--deep"]).exit_code == 0
