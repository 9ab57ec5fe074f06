"""`--executor ray` for prepare and score-entropy (rptdata/executors.py), on Ray clusters on this CPU:
the same output and manifest fields as the local executor (bad records included), a deleted shard
redone alone, a failing shard named with its input, on a two-node cluster a node removed mid-run,
and a cluster address where no Ray answers failing within seconds, naming it (rptdata/ray_connect.py).

Skipped when ray is not installed (`pip install -e '.[ray]'`; `make install` installs it)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from rptdata.io import list_shards, read_manifest  # noqa: E402
from rptdata.prepare import PrepareConfig, run_prepare  # noqa: E402
from rptdata.score import ScoreConfig, run_score_entropy  # noqa: E402

RPT = [str(Path(sys.executable).with_name("rpt"))]
SCORE = dict(keep_all=True, max_context=24, engine="hf", device="cpu", progress=False)
RAY_INIT = dict(include_dashboard=False, object_store_memory=80 * 1024 * 1024, log_to_driver=False)


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray cluster (2 CPU slots) in this process for the module; its address for the CLI."""
    ray.shutdown()
    ray.init(num_cpus=2, **RAY_INIT)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """40 records in 2 files with bad lines (malformed JSON, a missing field, invalid UTF-8) and an empty text."""
    folder = tmp_path_factory.mktemp("corpus")
    lines = [json.dumps({"text": f"doc {i}: " + "théorème 🎉 " * (i % 4) + "x" * (i % 7)}).encode() for i in range(30)]
    lines[5], lines[17], lines[23] = b"{broken", json.dumps({"body": "no text"}).encode(), b'{"text": "\xff"}'
    lines[11] = json.dumps({"text": "   "}).encode()
    (folder / "a.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (folder / "b.jsonl").write_bytes(
        b"\n".join(json.dumps({"text": f"second file {i}"}).encode() for i in range(10)) + b"\n"
    )
    return folder


def _same_output(a: Path, b: Path, stage: str) -> None:
    """Equal outputs apart from timings: every shard byte for byte (the manifests' sha256), counts, rejects;
    the manifests have the same fields, and the same `runtime` but for its timing."""
    ma, mb = read_manifest(a, stage), read_manifest(b, stage)
    assert ma["files"] == mb["files"] and ma["files"]
    for key in ("shards", "counts", "fingerprint", "config"):
        assert ma[key] == mb[key], key
    assert ma.keys() == mb.keys()
    assert {k: v for k, v in ma.get("runtime", {}).items() if k != "seconds"} == {
        k: v for k, v in mb.get("runtime", {}).items() if k != "seconds"
    }
    data = "docs" if stage == "prepare" else "positions"
    assert [p.read_bytes() for p in list_shards(a / data)] == [p.read_bytes() for p in list_shards(b / data)]
    ra, rb = a / "rejects.jsonl", b / "rejects.jsonl"
    assert (ra.read_text() if ra.exists() else None) == (rb.read_text() if rb.exists() else None)


def _prepare_cfg(corpus, out, **kw):
    return PrepareConfig(inputs=(str(corpus),), out=str(out), shard_docs=7, skip_bad=True, progress=False, **kw)


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("prep") / "local"
    run_prepare(_prepare_cfg(corpus, out))
    return out


def test_cli_prepare_on_ray_equals_local_and_redoes_a_deleted_shard_alone(local_ray, corpus, prepared, tmp_path):
    out = tmp_path / "ray"
    cmd = [
        *RPT,
        "prepare",
        str(corpus),
        "--out",
        str(out),
        "--shard-docs",
        "7",
        "--skip-bad",
        "--executor",
        "ray",
        "--ray-address",
        local_ray,
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (
        "prepare: 40 documents read, 36 written" in r.stdout and "prepare: 100%" in r.stderr
    )  # the driver's progress bar
    _same_output(prepared, out, "prepare")
    assert read_manifest(out, "prepare")["counts"]["documents_rejected"] == {
        "invalid_utf8": 1,
        "malformed_json": 1,
        "missing_field": 1,
    }

    shards = list_shards(out / "docs")
    before = {p.name: p.stat().st_mtime_ns for p in shards}
    shards[2].unlink()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    after = {p.name: p.stat().st_mtime_ns for p in list_shards(out / "docs")}
    assert [n for n in after if after[n] != before[n]] == [shards[2].name], "only the deleted shard is redone"
    _same_output(prepared, out, "prepare")


def test_failed_shard_names_shard_and_input_and_the_rest_finish(local_ray, corpus, tmp_path):
    out = tmp_path / "bad"
    r = subprocess.run(
        [
            *RPT,
            "prepare",
            str(corpus),
            "--out",
            str(out),
            "--shard-docs",
            "7",
            "--executor",
            "ray",
            "--ray-address",
            local_ray,
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "3 of 6 unit(s) failed" in r.stderr
    assert f"shard docs/part-00000.parquet (records 0-6 of the input stream, in {corpus / 'a.jsonl'})" in r.stderr
    assert f"{corpus / 'a.jsonl'}, line 6: malformed json" in r.stderr
    assert len(list_shards(out / "docs")) == 3 and not (out / "manifest.json").exists()


def test_ray_refuses_the_options_it_cannot_honour(corpus, tmp_path):
    with pytest.raises(ValueError, match="does not combine with --num-workers"):
        _prepare_cfg(corpus, tmp_path / "x", executor="ray", num_workers=2)
    with pytest.raises(ValueError, match="does not combine with --dedupe"):
        PrepareConfig(inputs=("x",), out="o", dedupe=True, executor="ray")
    with pytest.raises(ValueError, match="--ray-address is for --executor ray"):
        _prepare_cfg(corpus, tmp_path / "x", ray_address="127.0.0.1:6379")
    with pytest.raises(ValueError, match="does not combine with --worker-index"):
        ScoreConfig(prepared="p", out="o", executor="ray", worker_index=1)


@pytest.mark.slow
def test_score_on_ray_equals_local_and_records_the_same_runtime(local_ray, prepared, tmp_path):
    local = run_score_entropy(ScoreConfig(prepared=str(prepared), out=str(tmp_path / "local"), **SCORE))
    on_ray = run_score_entropy(ScoreConfig(prepared=str(prepared), out=str(tmp_path / "ray"), executor="ray", **SCORE))
    assert local["counts"] == on_ray["counts"] and local["counts"]["positions_scored"] > 100
    _same_output(tmp_path / "local", tmp_path / "ray", "score-entropy")
    # the scorers' resolved settings, as the actors ran them (the driver loads no scorer)
    assert local["runtime"].keys() == on_ray["runtime"].keys() == {"batch_tokens", "device", "worker", "seconds"}
    assert on_ray["runtime"]["batch_tokens"] == local["runtime"]["batch_tokens"] == 8192  # the CPU default
    assert on_ray["runtime"]["device"] == local["runtime"]["device"] == "cpu"
    assert on_ray["runtime"]["worker"] == local["runtime"]["worker"] == [0, 1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fails_fast(args: list[str], address: str, env: dict, given: str, limit: float = 10) -> str:
    """Run `rpt ARGS` with that cluster address; it must exit 1 within `limit` seconds, without a traceback,
    naming the address and where it was given; returns stderr."""
    started = time.monotonic()
    r = subprocess.run([*RPT, *args], capture_output=True, text=True, timeout=120, env=env)
    elapsed = time.monotonic() - started
    assert r.returncode == 1, r.stderr[-2000:]
    assert elapsed < limit, f"took {elapsed:.1f} s: {r.stderr[-2000:]}"
    assert "Traceback" not in r.stderr
    assert f"Error: no Ray cluster at {address} ({given}" in r.stderr, r.stderr
    return r.stderr


@pytest.mark.parametrize("command", ["prepare", "score-entropy", "prepare ray://", "score-entropy RAY_ADDRESS"])
def test_a_cluster_address_where_nothing_listens_fails_within_10_s_naming_it(command, corpus, prepared, tmp_path):
    """Where ray.init retried for minutes (to an address of its own: it rewrites 127.0.0.1 to this
    node's IP), the command stops within 10 s, names the address as given, and writes nothing."""
    stage, _, how = command.partition(" ")
    address = f"{'ray://' if how == 'ray://' else ''}127.0.0.1:{_free_port()}"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RPT_RAY_CONNECT_TIMEOUT")}
    args = [stage, str(corpus if stage == "prepare" else prepared), "--out", str(tmp_path / "out")]
    args += ["--executor", "ray", "--no-progress"]
    if how == "RAY_ADDRESS":
        env["RAY_ADDRESS"] = address
    else:
        args += ["--ray-address", address]
    err = _fails_fast(args, address, env, "RAY_ADDRESS" if how == "RAY_ADDRESS" else "--ray-address")
    assert "nothing listens there (connection refused)" in err
    assert not (tmp_path / "out").exists()


def test_a_listener_that_is_not_ray_fails_within_the_connect_timeout(corpus, tmp_path):
    """Something accepts TCP connections there but never answers as a Ray GCS: the probe gives up after
    RPT_RAY_CONNECT_TIMEOUT seconds (3 here) instead of Ray's 20 attempts of 40 s."""
    with socket.socket() as listener:
        listener.bind(("", 0))  # every interface: Ray dials 127.0.0.1 as this node's own IP
        listener.listen(16)  # the kernel completes the handshakes; nothing ever reads or answers
        address = f"127.0.0.1:{listener.getsockname()[1]}"
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env["RPT_RAY_CONNECT_TIMEOUT"] = "3"
        args = ["prepare", str(corpus), "--out", str(tmp_path / "out"), "--executor", "ray", "--ray-address", address]
        err = _fails_fast(args, address, env, "--ray-address")
    assert "no Ray GCS answered within 3 s" in err and not (tmp_path / "out").exists()


def _run_in_thread(fn, *args):
    result = {}
    thread = threading.Thread(target=lambda: result.update(value=fn(*args)), daemon=True)
    thread.start()
    return thread, result


def _wait_for(path: Path, timeout: float = 600) -> str:
    deadline = time.time() + timeout
    while not (path.exists() and path.read_text().strip()):
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.2)
    return path.read_text().split()[0]


@pytest.mark.slow
def test_node_removed_mid_run_its_shards_finish_on_the_other_node(corpus, prepared, tmp_path, monkeypatch):
    """Two worker nodes of one CPU. The doomed one hangs at the first shard it gets (RPT_FAULT=unit:1:hang
    in its processes only; it writes the shard's index to the note), the other waits at its first shard
    until that has happened (unit:1:wait), so both hold one; then the doomed node is removed. Its shard
    finishes on the other node, and the output equals a clean run: prepare (Ray tasks), score (actors)."""
    from ray.cluster_utils import Cluster

    ray.shutdown()
    monkeypatch.delenv("RPT_FAULT", raising=False)
    note = tmp_path / "hung"
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "include_dashboard": False, "object_store_memory": 80 * 1024 * 1024},
    )
    try:
        cluster.add_node(num_cpus=1, env_vars={"RPT_FAULT": "unit:1:wait", "RPT_FAULT_NOTE": str(note)})
        ray.init(address=cluster.address, log_to_driver=False)
        score_local = tmp_path / "score-local"  # torch with one thread, as in the actors of these 1-CPU nodes
        subprocess.run(
            [
                *RPT,
                "score-entropy",
                str(prepared),
                "--out",
                str(score_local),
                "--keep-all",
                "--max-context",
                "24",
                "--engine",
                "hf",
                "--device",
                "cpu",
                "--no-progress",
            ],
            check=True,
            timeout=600,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        for stage, run, cfg, expected in (
            ("prepare", run_prepare, _prepare_cfg(corpus, tmp_path / "prep", executor="ray"), prepared),
            (
                "score-entropy",
                run_score_entropy,
                ScoreConfig(prepared=str(prepared), out=str(tmp_path / "score"), executor="ray", **SCORE),
                score_local,
            ),
        ):
            note.unlink(missing_ok=True)
            doomed = cluster.add_node(num_cpus=1, env_vars={"RPT_FAULT": "unit:1:hang", "RPT_FAULT_NOTE": str(note)})
            thread, result = _run_in_thread(run, cfg)
            hung = int(_wait_for(note))
            assert not (
                Path(cfg.out) / "done" / f"{'docs' if stage == 'prepare' else 'positions'}-{hung:05d}.json"
            ).exists()
            cluster.remove_node(doomed)
            thread.join(timeout=600)
            assert not thread.is_alive() and result["value"].get("complete", True), f"{stage} did not finish"
            assert (
                Path(cfg.out) / "done" / f"{'docs' if stage == 'prepare' else 'positions'}-{hung:05d}.json"
            ).exists()
            _same_output(expected, Path(cfg.out), stage)
    finally:
        ray.shutdown()
        cluster.shutdown()
