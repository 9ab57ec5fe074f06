"""rptdata/stage.py: claim_run_dir (the one refuse / resume / overwrite rule) and shard_index."""

from __future__ import annotations

import json

import pytest

from rptdata.errors import ManifestMismatch
from rptdata.io import RUN_FILE, shard_index
from rptdata.stage import claim_run_dir

OWN = ("work", "result.json")
KEPT = ("work/*",)


def claim(root, identity, **kw):
    return claim_run_dir(root, "demo", identity, OWN, progress=KEPT, finished="result.json", **kw)


def test_new_resume_done(tmp_path):
    root = tmp_path / "out"
    assert claim(root, {"a": 1}) == "new"
    record = json.loads((root / RUN_FILE).read_text())
    assert record["stage"] == "demo" and record["config"] == {"a": 1}
    assert claim(root, {"a": 1}) == "new"  # nothing kept yet: start (again) from scratch
    (root / "work").mkdir()
    (root / "work" / "part-0").write_text("x")
    assert claim(root, {"a": 1}) == "resume"
    assert claim(root, {"a": 1}, resume=True) == "resume"
    with pytest.raises(ManifestMismatch, match="--resume"):
        claim(root, {"a": 1}, resume=False)
    (root / "result.json").write_text("{}")
    assert claim(root, {"a": 1}) == "done"


def test_other_settings_refused_unless_nothing_kept_or_overwrite(tmp_path):
    root = tmp_path / "out"
    claim(root, {"a": 1, "b": {"c": 2}})
    assert claim(root, {"a": 1, "b": {"c": 3}}) == "new"  # a false start has nothing to protect
    (root / "work").mkdir()
    (root / "work" / "part-0").write_text("x")
    with pytest.raises(ManifestMismatch, match=r"different settings \(b.c differ"):
        claim(root, {"a": 1, "b": {"c": 4}}, resume=True)
    assert claim(root, {"a": 1, "b": {"c": 4}}, overwrite=True) == "new"
    assert not (root / "work").exists()


def test_foreign_files_and_other_stages(tmp_path):
    root = tmp_path / "mine"
    root.mkdir()
    (root / "notes.txt").write_text("mine")
    with pytest.raises(ManifestMismatch, match="not empty"):
        claim(root, {"a": 1})
    assert claim(root, {"a": 1}, overwrite=True) == "new"
    assert (root / "notes.txt").read_text() == "mine"  # overwrite never removes what is not ours
    other = tmp_path / "other"
    claim_run_dir(other, "prepare", {"a": 1}, ("docs",))
    with pytest.raises(ManifestMismatch, match="`rpt prepare` run, not `rpt demo`"):
        claim(other, {"a": 1})
    lost = tmp_path / "lost"  # kept work whose record is gone cannot be verified
    (lost / "work").mkdir(parents=True)
    (lost / "work" / "part-0").write_text("x")
    with pytest.raises(ManifestMismatch, match="no run.json"):
        claim(lost, {"a": 1}, resume=True)


def test_shard_index_refuses_other_names():
    assert shard_index("x/part-00007.parquet") == 7
    with pytest.raises(ValueError, match="not a shard name"):
        shard_index("x/notes.parquet")
