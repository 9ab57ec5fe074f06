"""What `rpt train` reads (rpttrain.data): memory-mapped shards, task rows, document windows, the
epoch sampler and its cursor.

Run: .venv/bin/python -m pytest -q tests/test_data.py
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rptdata.errors import RptError
from rptdata.tasks.taskdef import split_rule
from rpttrain.data import EpochSampler, TaskRows, load_tasks, mmap_shards, trained_on_record
from tests.rpt_fixtures import write_tasks_dir


def _shards(tmp_path, sizes):
    paths, rows = [], []
    for i, n in enumerate(sizes):
        part = [{"k": f"s{i}-r{j}", "ids": list(range(j, j + 3)), "x": float(j)} for j in range(n)]
        rows += part
        path = tmp_path / f"p{i}.parquet"
        schema = pa.schema([("k", pa.string()), ("ids", pa.list_(pa.int32())), ("x", pa.float64())])
        pq.write_table(pa.Table.from_pylist(part, schema=schema), path, row_group_size=7)
        paths.append(path)
    return paths, rows


def test_mmap_shards_keeps_order_columns_and_reuses_its_cache(tmp_path):
    paths, rows = _shards(tmp_path, [20, 0, 33])
    allocated = pa.total_allocated_bytes()
    table = mmap_shards(paths, ["k", "ids"], tmp_path / "cache")
    assert table.column_names == ["k", "ids"]
    assert table.to_pylist() == [{"k": r["k"], "ids": r["ids"]} for r in rows]
    assert pa.total_allocated_bytes() - allocated < 1024  # memory-mapped, not read into the heap
    files = sorted((tmp_path / "cache").iterdir())
    assert [f.name for f in files] == ["part-00000.arrow", "part-00001.arrow", "part-00002.arrow"]
    stamps = [os.stat(f).st_mtime_ns for f in files]
    again = mmap_shards(paths, ["k", "ids"], tmp_path / "cache")
    assert again.equals(table) and [os.stat(f).st_mtime_ns for f in files] == stamps  # not rewritten
    assert table.take(pa.array([52, 0, 20])).column("k").to_pylist() == ["s2-r32", "s0-r0", "s2-r0"]


def test_a_half_written_cache_file_is_not_taken_for_a_finished_one(tmp_path):
    paths, rows = _shards(tmp_path, [5])
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "part-00000.arrow.tmp-123").write_bytes(b"partial")
    table = mmap_shards(paths, ["k"], tmp_path / "cache")
    assert table.column("k").to_pylist() == [r["k"] for r in rows]


def test_task_rows_are_the_train_split_in_shard_order(tmp_path, tiny_bpe_dir):
    pairs = [(f"context {i}", f" next{i}") for i in range(40)]
    tasks = write_tasks_dir(tmp_path / "t", str(tiny_bpe_dir), pairs, eval_pairs=[("e", " f")])
    rows = TaskRows(tasks, tmp_path / "cache")
    want = load_tasks(tasks, "train")
    assert len(rows) == 40
    got = rows.take([39, 0, 17])
    keys = ["task_id", "doc_id", "context", "continuation", "boundaries", "target_id", "accept_mass", "live", "band"]
    keys += ["unit", "context_after"]
    # the live estimate, the band and the unit's columns ride along
    assert got == [{k: want[i][k] for k in keys} for i in (39, 0, 17)]


def test_an_empty_training_split_is_a_clear_error(tmp_path, tiny_bpe_dir):
    tasks = write_tasks_dir(tmp_path / "t", str(tiny_bpe_dir), [], eval_pairs=[("e", " f")])
    with pytest.raises(RptError, match="nothing to train on"):
        EpochSampler(TaskRows(tasks, tmp_path / "cache"), seed=0)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 40), takes=st.lists(st.integers(1, 25), min_size=1, max_size=8), seed=st.integers(0, 5))
def test_sampler_epochs_cover_every_item_once_and_the_cursor_resumes_exactly(n, takes, seed):
    items = list(range(n))
    sampler = EpochSampler(items, seed)
    drawn = []
    for k in takes:
        before = sampler.cursor()
        batch = sampler.take(k)
        assert len(batch) == k
        # a sampler rebuilt from the cursor draws the same batch
        assert EpochSampler(items, seed, **before).take(k) == batch
        drawn += batch
    for e in range(len(drawn) // n):  # every complete epoch is a permutation
        assert sorted(drawn[e * n : (e + 1) * n]) == items
    assert sampler.cursor()["epoch"] * n + sampler.cursor()["offset"] == len(drawn)


def test_sampler_gives_the_same_rows_from_a_list_and_from_task_rows(tmp_path, tiny_bpe_dir):
    pairs = [(f"context {i}", f" next{i}") for i in range(13)]
    tasks = write_tasks_dir(tmp_path / "t", str(tiny_bpe_dir), pairs)
    as_list = [r["task_id"] for r in load_tasks(tasks, "train")]
    a, b = EpochSampler(as_list, 7), EpochSampler(TaskRows(tasks, tmp_path / "c"), 7)
    for k in (5, 9, 13):
        assert a.take(k) == [r["task_id"] for r in b.take(k)]
    assert np.asarray(b._order).dtype == np.uint32


def test_trained_on_record_names_the_source_train_reads(tmp_path, monkeypatch):
    manifest = {"fingerprint": "f00d", "split": {"hash": "sha256", "seed": 3, "eval_fraction": 0.1, "key": "k"}}
    rule = split_rule(3, 0.1)  # the full rule, as make-tasks writes it
    (tmp_path / "tasks").mkdir()
    for objective, positions, source, documents in (
        ("rpt", "all", "task-rows", "train-split-tasks"),  # rpt always trains on the task rows
        ("ntp", "all", "doc-windows", "train-split-documents"),
        ("shaped-ntp", "all", "doc-windows", "train-split-documents"),
        ("ntp", "tasks", "task-rows", "train-split-tasks"),
    ):
        record = trained_on_record(objective, positions, tmp_path / "tasks", manifest)
        assert record == {
            "objective": objective,
            "task_kind": "next-token",
            "started_from": None,
            "source": source,
            "tasks_dir": str((tmp_path / "tasks").resolve()),
            "tasks_fingerprint": "f00d",
            "split_rule": rule,
            "documents": documents,
        }
    # a relative tasks_dir is recorded absolute, so eval finds it from anywhere
    monkeypatch.chdir(tmp_path)
    assert trained_on_record("rpt", "all", "tasks", manifest)["tasks_dir"] == str((tmp_path / "tasks").resolve())
    assert trained_on_record("rpt", "all", "t", {"split": {"seed": 3}})["split_rule"] is None
    assert trained_on_record("rpt", "all", "t", {})["split_rule"] is None
