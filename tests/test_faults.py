"""Crash and damage tests of every stage (issue 18), on a tiny pipeline: the tiny byte-level BPE
tokenizer, a tiny random Llama, 24 short documents in 6 shards.

Kills: each stage runs once as a subprocess counting the fault points it reaches (rptdata/faults.py);
a seeded schedule then draws kill points (point, n-th time) covering every point reached; each
kill is a fresh run SIGKILLed there, then the same command again (train and eval: --resume); the
final output must equal the uninterrupted run's (rows compared order-independently; train: the
metrics and the last checkpoint's weights). Damage: each kind of file a stage reads is truncated or
altered, and the consumer must stop with an error naming it (never a usage error), or the producer
rerun must redo it. A full disk: OSError(ENOSPC) at the shard write leaves no shard taken for
complete.

    make test-faults                                   # the whole suite (marker `faults`), a few minutes
    make stress-faults STAGE=train                     # every kill point the stage reaches (RPT_FAULT_KILLS)
    .venv/bin/python -m pytest -q tests/test_faults.py -m "not faults"   # the fast subset (in `make test`)
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from cli.main import cli
from rptdata.io import list_shards
from rptdata.stage import StageDir
from rptdata.verify import verify_dir
from tests.rpt_fixtures import tiny_llama

ROOT = Path(__file__).resolve().parents[1]
SEED = 18
KILLS = int(
    os.environ.get("RPT_FAULT_KILLS", "6")
)  # kill points per stage (at least; more when it reaches more points)
STAGES = ("prepare", "score-entropy", "make-tasks", "train", "eval", "export-tasks")
FIGURES: dict[str, dict] = {"kills_survived": {}, "kills_drawn": {}, "damage_detected": {}}
TEXTS = [f"The quick brown fox {i} jumps over the lazy dog {i * 7}. 1234567890 {i}" for i in range(24)]


# ---------------------------------------------------------------------------------------------
# the pipeline


class Pipeline:
    """Inputs, the command of each stage, and each stage's uninterrupted output (`base/<stage>`)."""

    def __init__(self, root: Path, tokenizer: Path):
        self.root = root
        self.tokenizer = tokenizer
        # tied embeddings (as SmolLM2), warmed on the corpus: train's groups hold both rewards, so its
        # steps have a gradient for a resume to get right (a random model's are all exactly zero)
        self.model = tiny_llama(root / "model", tokenizer, tie=True, warm_texts=TEXTS)
        self.corpus = root / "docs.jsonl"
        self.corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
        self.base = {s: root / "base" / s for s in STAGES}
        self.hits: dict[str, dict] = {}

    def argv(self, stage: str, out: Path, rerun: bool = False) -> list[str]:
        b, model = self.base, str(self.model)
        cmd = {
            # the corpus by its name, run from `root`: doc ids (`docs.jsonl#N`), and so the train/eval split
            # and the tasks train draws, do not depend on where pytest puts its temporary folder
            "prepare": ["prepare", self.corpus.name, "--tokenizer", str(self.tokenizer), "--shard-docs", "4"],
            "score-entropy": [
                "score-entropy",
                str(b["prepare"]),
                "--model",
                model,
                "--keep-all",
                "--max-context",
                "32",
                "--min-context",
                "2",
                "--engine",
                "hf",
                "--dtype",
                "float32",
                "--device",
                "cpu",
            ],
            "make-tasks": [
                "make-tasks",
                str(b["score-entropy"]),
                "--threshold",
                "0",
                "--context-tokens",
                "8",
                "--eval-fraction",
                "0.5",
                "--seed",
                "1",
            ],
            "train": [
                "train",
                str(b["make-tasks"]),
                "--model",
                model,
                "--steps",
                "4",
                "--batch-size",
                "4",
                "--group-size",
                "4",
                "--max-new-tokens",
                "1",
                "--prompt-template",
                "continuation",
                "--save-every",
                "1",
                "--keep-checkpoints",
                "2",
                "--device",
                "cpu",
                "--dynamic-sampling-from",
                "-1",
                "--micro-batch-tokens",
                "24",
                "--sample-every",
                "0",
                "--lr",
                "1e-2",
                # with these tasks (now the same in every temporary folder), seed 1 gives every step a
                # gradient (seeds 2 and 5 leave a step without one), as the train stage's check wants
                "--seed",
                "1",
            ],
            "eval": [
                "eval",
                str(b["make-tasks"]),
                "--checkpoints",
                str(b["train"]),
                "--mode",
                "ntp",
                "--device",
                "cpu",
                "--limit",
                "8",
                "--flush-every",
                "3",
            ],
            "export-tasks": ["export-tasks", str(b["make-tasks"]), "--format", "verl"],
        }[stage]
        return (
            cmd + ["--out", str(out), "--no-progress"] + (["--resume"] if rerun and stage in ("train", "eval") else [])
        )

    def run(self, stage: str, out: Path, fault: str | None = None, count: Path | None = None, rerun: bool = False):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        env.pop("RPT_FAULT", None)
        if fault:
            env["RPT_FAULT"] = fault
        if count:
            env["RPT_FAULT_COUNT"] = str(count)
        return subprocess.run(
            [sys.executable, "-c", "from cli.main import cli; cli()", *self.argv(stage, out, rerun)],
            env=env,
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=600,
        )


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, tiny_bpe_dir):
    """Every stage run once, uninterrupted, counting the fault points it reaches."""
    p = Pipeline(tmp_path_factory.mktemp("faults"), Path(tiny_bpe_dir))
    for stage in STAGES:
        count = p.root / f"hits-{stage}.json"
        r = p.run(stage, p.base[stage], count=count)
        assert r.returncode == 0, r.stderr[-3000:]
        p.hits[stage] = json.loads(count.read_text())
    yield p
    print("\nfault figures:", json.dumps(FIGURES, indent=1, sort_keys=True))


# ---------------------------------------------------------------------------------------------
# comparing outputs


def _rows(paths) -> list[str]:
    """Every row of these Parquet files as sorted JSON lines: order-independent, duplicates kept."""
    out = []
    for path in paths:
        out += [json.dumps(r, sort_keys=True, default=str) for r in pq.read_table(path).to_pylist()]
    return sorted(out)


def _timeless(d):
    """A metrics line or report without the fields that measure time or name the folder."""
    if isinstance(d, dict):
        return {
            k: _timeless(v)
            for k, v in d.items()
            if not (
                k.endswith("_s")
                or k
                in ("seconds", "finished", "time", "dir", "run_dir", "out", "files", "rollout_tokens_per_s", "created")
            )
        }
    if isinstance(d, list):
        return [_timeless(x) for x in d]
    return d


def output_of(stage: str, out: Path) -> dict:
    """What must not change between an interrupted-and-rerun run and an uninterrupted one."""
    if stage in ("prepare", "score-entropy", "make-tasks"):
        manifest = json.loads((out / "manifest.json").read_text())
        assert verify_dir(out, deep=True)["problems"] == []
        dirs = {"prepare": ["docs"], "score-entropy": ["positions"], "make-tasks": ["train", "eval"]}[stage]
        return {
            "rows": {d: _rows(list_shards(out / d)) for d in dirs},
            "counts": manifest["counts"],
            "files": {k: v["rows"] for k, v in manifest["files"].items()},
        }
    if stage == "train":
        from safetensors.torch import load_file

        from rpttrain.checkpoint import list_checkpoints

        metrics = [_timeless(json.loads(x)) for x in (out / "metrics.jsonl").read_text().splitlines()]
        ckpts = list_checkpoints(out)
        assert verify_dir(out)["problems"] == []
        weights = load_file(str(ckpts[-1] / "model.safetensors"))
        return {
            "metrics": metrics,
            "checkpoints": [c.name for c in ckpts],
            "weights": {k: v.flatten().tolist() for k, v in sorted(weights.items())},
        }
    if stage == "eval":
        report = json.loads((out / "report.json").read_text())
        return {
            "predictions": _rows([out / "predictions.parquet"]),
            "parts": _rows(list_shards(out / "predictions")),
            "results": _timeless(report.get("results", report.get("subjects"))),
        }
    if stage == "export-tasks":
        manifest = json.loads((out / "manifest.json").read_text())
        return {
            "rows": {s: _rows([out / f"{s}.parquet"]) for s in ("train", "eval")},
            "counts": manifest["rows"],
            "checksums": manifest["checksums"],
        }
    raise AssertionError(stage)


# ---------------------------------------------------------------------------------------------
# kills


def kill_schedule(stage: str, hits: dict[str, int], seed: int = SEED) -> list[tuple[str, int]]:
    """(point, n) kill points: one at a random hit of every point the stage reaches, then random
    further ones, at least KILLS in all (fewer only if the stage reaches fewer hits in total).

    >>> kill_schedule("x", {"shard-tmp": 6, "marker": 6, "manifest": 1}, seed=0)[:3]
    [('manifest', 1), ('marker', 5), ('shard-tmp', 2)]
    """
    rng = random.Random(f"{seed}-{stage}")
    pool = [(p, n) for p, count in sorted(hits.items()) for n in range(1, count + 1)]
    chosen = [(p, rng.randint(1, count)) for p, count in sorted(hits.items()) if count]
    rest = [x for x in pool if x not in chosen]
    rng.shuffle(rest)
    return chosen + rest[: max(0, KILLS - len(chosen))]


@pytest.mark.faults
@pytest.mark.parametrize("stage", STAGES)
def test_killed_stage_reruns_to_the_uninterrupted_output(pipeline, stage, tmp_path):
    expected = output_of(stage, pipeline.base[stage])
    if stage == "train":  # every checkpoint a rerun resumes from follows a step with a gradient
        norms = [m["grad_norm"] for m in expected["metrics"]]
        assert all(n > 0 for n in norms[:-1]), norms
    schedule = kill_schedule(stage, pipeline.hits[stage])
    assert len(schedule) >= 5, (stage, pipeline.hits[stage])
    survived = []
    for point, n in schedule:
        out = tmp_path / f"{point}-{n}"
        killed = pipeline.run(stage, out, fault=f"{point}:{n}")
        assert killed.returncode == -9, (stage, point, n, killed.returncode, killed.stderr[-2000:])
        again = pipeline.run(stage, out, rerun=True)
        assert again.returncode == 0, (stage, point, n, again.stderr[-3000:])
        assert output_of(stage, out) == expected, (stage, point, n)
        survived.append(f"{point}:{n}")
        shutil.rmtree(out)
    FIGURES["kills_drawn"][stage] = survived
    FIGURES["kills_survived"][stage] = len(survived)


def test_killed_between_shard_and_marker_reruns_to_the_same_rows(tmp_path, tiny_bpe_dir):
    """The fast kill check (default suite): `rpt prepare` killed at the 2nd shard's marker."""
    p = Pipeline(tmp_path, Path(tiny_bpe_dir))
    assert p.run("prepare", tmp_path / "whole").returncode == 0
    killed = p.run("prepare", tmp_path / "part", fault="marker:2")
    assert killed.returncode == -9
    assert [x.name for x in list_shards(tmp_path / "part" / "docs")] == ["part-00000.parquet", "part-00001.parquet"]
    assert not (tmp_path / "part" / "done" / "docs-00001.json").exists()  # the shard without its marker
    assert p.run("prepare", tmp_path / "part").returncode == 0
    assert output_of("prepare", tmp_path / "part") == output_of("prepare", tmp_path / "whole")


# ---------------------------------------------------------------------------------------------
# a full disk


def test_disk_full_at_a_shard_write_leaves_no_half_shard(tmp_path, tiny_bpe_dir):
    from rptdata import faults
    from rptdata.prepare import PrepareConfig, run_prepare

    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))

    def prepare(out):
        return run_prepare(
            PrepareConfig(
                inputs=(str(corpus),), out=str(out), tokenizer=str(tiny_bpe_dir), shard_docs=4, progress=False
            )
        )

    whole = prepare(tmp_path / "whole")
    out = tmp_path / "full"
    # the 3rd shard's file fails: 2 shards complete; then (resumed) the 2nd marker written (shard 3's) fails:
    # shard 3 is in place without its marker, and is not taken for complete
    for spec, marked, on_disk in (("shard-tmp:3:enospc", 2, 2), ("json-tmp:2:enospc", 3, 4)):
        faults.arm(spec)
        try:
            with pytest.raises(OSError, match="No space left on device"):
                prepare(out)
        finally:
            faults.arm(None)
        assert not [p for p in out.rglob("*") if ".tmp-" in p.name]  # the temporary files are gone
        assert len(list_shards(out / "docs")) == on_disk
        assert sorted(StageDir(out, "prepare", ["docs"]).done_shards("docs")) == list(range(marked))
        assert not (out / "manifest.json").exists()
    # the CLI reports it as an error naming the file, not a traceback or a usage error
    faults.arm("shard-tmp:1:enospc")
    try:
        r = CliRunner().invoke(
            cli,
            [
                "prepare",
                str(corpus),
                "--tokenizer",
                str(tiny_bpe_dir),
                "--shard-docs",
                "4",
                "--out",
                str(out),
                "--no-progress",
            ],
        )
    finally:
        faults.arm(None)
    assert r.exit_code == 1 and "part-00003.parquet.tmp-" in r.output and "No space left on device" in r.output, (
        r.output
    )
    again = prepare(out)
    assert again["files"] == whole["files"] and again["counts"] == whole["counts"]


# ---------------------------------------------------------------------------------------------
# damaged files


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 3)])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _garble(path: Path) -> None:
    path.write_text("{not: [valid")


# kind, stage whose output is damaged, file (relative), damage, consumer stage | None (the producer
# is rerun), what the error must say
DAMAGE = [
    ("shard", "prepare", "docs/part-00001.parquet", _flip, "score-entropy", "its sha256 differs"),
    ("shard", "score-entropy", "positions/part-00002.parquet", _truncate, "make-tasks", "bytes, its record says"),
    ("shard", "make-tasks", "train/part-00000.parquet", _truncate, "train", "bytes, its record says"),
    ("shard", "make-tasks", "eval/part-00003.parquet", _flip, "eval", "its sha256 differs"),
    ("shard", "make-tasks", "train/part-00004.parquet", _flip, "export-tasks", "its sha256 differs"),
    ("shard", "prepare", "docs/part-00002.parquet", _truncate, None, None),
    ("marker", "score-entropy", "done/positions-00001.json", _garble, None, None),
    ("marker", "make-tasks", "done/eval-00002.json", _truncate, None, None),
    ("manifest", "score-entropy", "manifest.json", _garble, "make-tasks", "not valid JSON"),
    ("manifest", "make-tasks", "manifest.json", _truncate, None, None),
    ("run.json", "prepare", "run.json", _garble, "prepare", "not valid JSON"),
    (
        "checkpoint weights",
        "train",
        "checkpoints/step-000004/model.safetensors",
        _truncate,
        "train",
        "damaged checkpoint file",
    ),
    (
        "checkpoint weights",
        "train",
        "checkpoints/step-000004/model.safetensors",
        _flip,
        "eval",
        "damaged checkpoint file",
    ),
    ("optimizer state", "train", "checkpoints/step-000004/trainer_state.pt", _flip, "train", "damaged checkpoint file"),
    ("checkpoint state.json", "train", "checkpoints/step-000004/state.json", _garble, "train", "not valid JSON"),
    ("config.yaml", "train", "config.yaml", _garble, "eval", "not valid YAML"),
]


@pytest.mark.faults
@pytest.mark.parametrize(
    "kind,producer,rel,damage,consumer,message",
    DAMAGE,
    ids=[f"{d[0]}-{d[2].rsplit('/', 1)[-1]}-{d[4] or 'redo'}" for d in DAMAGE],
)
def test_damaged_file_is_named_or_redone(
    pipeline, tmp_path, monkeypatch, kind, producer, rel, damage, consumer, message
):
    # damage a copy of the producer's output; consumers read it through a copied upstream
    copy = tmp_path / producer
    shutil.copytree(pipeline.base[producer], copy)
    damage(copy / rel)
    if consumer is None:  # the producer's own rerun must notice and redo only that
        r = pipeline.run(producer, copy)  # a subprocess like the base run: the same float results (threads)
        assert r.returncode == 0, r.stderr[-3000:]
        assert "redoing a damaged shard" in r.stderr and rel.rsplit("/", 1)[-1] in r.stderr or kind != "shard"
        assert output_of(producer, copy) == output_of(producer, pipeline.base[producer])
    else:
        argv = pipeline.argv(consumer, tmp_path / "out", rerun=consumer == producer)
        argv = [str(copy) if a == str(pipeline.base[producer]) else a for a in argv]
        if consumer == producer:
            argv[argv.index("--out") + 1] = str(copy)
        monkeypatch.chdir(pipeline.root)  # where the pipeline runs (prepare names its corpus relative to it)
        r = CliRunner().invoke(cli, argv)
        assert r.exit_code == 1, (r.exit_code, r.output)
        assert "Usage:" not in r.output and "Traceback" not in r.output
        assert str(copy / rel) in r.output and message in r.output, r.output
    FIGURES["damage_detected"].setdefault(kind, 0)
    FIGURES["damage_detected"][kind] += 1


def _train_stopped_at(fault: str, config) -> None:
    """`run_train(config)` failing with a disk-full error at fault point `fault` (armed for this run only)."""
    from rptdata import faults
    from rpttrain.train import run_train

    faults.arm(fault)
    try:
        with pytest.raises(OSError):
            run_train(config)
    finally:
        faults.arm(None)


def test_train_failing_in_its_first_checkpoint_write_logs_each_step_once(tmp_path, tiny_bpe_dir):
    """A run that fails (disk full) while writing its first checkpoint leaves no half-written
    checkpoint (the write removes its temporary folder): the rerun starts from step 0 and must not
    log step 1 twice (it did, before the fault suite found it)."""
    from rpttrain.train import run_train
    from tests.rpt_fixtures import tiny_train_config, write_tasks_dir

    tasks = write_tasks_dir(tmp_path / "tasks", str(tiny_bpe_dir), [("The quick brown", " fox"), ("The lazy", " dog")])
    model = tiny_llama(tmp_path / "m", tiny_bpe_dir)
    config = tiny_train_config(tasks, model, tmp_path / "run", steps=2, batch_size=2, group_size=2)
    _train_stopped_at("checkpoint-rename:1:enospc", config)
    assert not list((tmp_path / "run" / "checkpoints").glob("step-000001*"))
    run_train(config, resume=True)
    steps = [json.loads(x)["step"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


def test_a_run_stopped_before_its_last_prune_keeps_keep_checkpoints(tmp_path, tiny_bpe_dir):
    """Stopped between writing its last checkpoint and pruning the older ones, then resumed with no
    step left to train: the run ends with --keep-checkpoints checkpoints, as an uninterrupted run
    does (the stress run of every train kill point found one too many: checkpoint-prune at the end)."""
    from rpttrain.train import run_train
    from tests.rpt_fixtures import tiny_train_config, write_tasks_dir

    tasks = write_tasks_dir(tmp_path / "tasks", str(tiny_bpe_dir), [("The quick brown", " fox"), ("The lazy", " dog")])
    model = tiny_llama(tmp_path / "m", tiny_bpe_dir)
    config = tiny_train_config(
        tasks, model, tmp_path / "run", steps=3, batch_size=2, group_size=2, save_every=1, keep_checkpoints=2
    )
    _train_stopped_at("checkpoint-prune:3:enospc", config)
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step-*")) == ["step-000001", "step-000002", "step-000003"]
    assert run_train(config, resume=True)["steps"] == 3
    assert sorted(p.name for p in ckpts.glob("step-*")) == ["step-000002", "step-000003"]
