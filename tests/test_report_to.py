"""`rpt train --report-to`: the names, the backends' mappings, and a real offline wandb run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rptdata.errors import RptError
from rpttrain.config import TrainConfig
from rpttrain.report_to import SAMPLE_COLUMNS, parse_report_to, require_wandb, verl_loggers

RPT = [sys.executable, "-c", "from cli.main import cli; cli()"]
REPO = Path(__file__).resolve().parents[1]


def wandb_records(path: Path) -> list[bytes]:
    """The records of a .wandb transaction log: a 7-byte header (":W&B", magic, version), then
    LevelDB-log records (crc32 4, length 2, type 1: full / first / middle / last) in 32 KiB blocks."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:8]
    records, pos, chunks = [], 7, []
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # a block's tail too short for a record header is padding
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        if kind == 0:
            break
        chunks.append(data[pos + 7 : pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):  # full, last
            records.append(b"".join(chunks))
            chunks = []
    return records


def read_offline_run(run: Path) -> tuple[list[dict], dict, Path]:
    """An offline wandb run under RUN/wandb, read back from its transaction log with wandb's own
    protobuf records: its history rows, its config, and its folder (files/media/ holds the tables)."""
    from wandb.proto import wandb_internal_pb2

    offline = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(offline) == 1, list((run / "wandb").rglob("*"))
    history, config = [], {}
    for data in wandb_records(offline[0]):
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(data)
        if rec.WhichOneof("record_type") == "history":
            history.append(
                {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in rec.history.item}
            )
        elif rec.WhichOneof("record_type") == "run":
            config.update({item.key: json.loads(item.value_json) for item in rec.run.config.update})
    return history, config, offline[0].parent


def samples_table(folder: Path, step: int) -> dict:
    """The `samples` table logged at `step`, as wandb wrote it ({"columns", "data"})."""
    return json.loads(next(folder.glob(f"files/media/table/samples_{step}_*.table.json")).read_text())


def test_report_to_names():
    assert parse_report_to("tensorboard") == ("tensorboard",)
    assert parse_report_to("wandb, tensorboard,wandb") == ("wandb", "tensorboard")
    assert parse_report_to("none") == ()
    with pytest.raises(ValueError, match="mlflow is not one of tensorboard, wandb, none"):
        TrainConfig("t", "o", report_to="mlflow")
    with pytest.raises(ValueError, match="'none' cannot be combined"):
        parse_report_to("none,wandb")
    # logging does not change what a run computes: a resume may switch it
    assert TrainConfig("t", "o", report_to="wandb").identity() == TrainConfig("t", "o").identity()


def test_backends_map_report_to():
    from rpttrain.backends import unsupported_options
    from rpttrain.backends.trl import grpo_args

    config = TrainConfig(
        "t",
        "o",
        report_to="wandb",
        batch_size=2,
        group_size=2,
        max_new_tokens=1,
        max_prompt_tokens=63,
        micro_batch_tokens=256,
    )
    assert unsupported_options(config, "trl") == [] and unsupported_options(config, "verl") == []
    assert grpo_args(config)["report_to"] == ["wandb"]
    assert (
        grpo_args(
            TrainConfig(
                "t",
                "o",
                report_to="none",
                batch_size=2,
                group_size=2,
                max_new_tokens=1,
                max_prompt_tokens=63,
                micro_batch_tokens=256,
            )
        )["report_to"]
        == "none"
    )
    assert verl_loggers("tensorboard,wandb") == ["console", "file", "tensorboard", "wandb"]
    assert verl_loggers("none") == ["console", "file"]


def test_missing_wandb_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # what `import wandb` does when it is not installed
    with pytest.raises(RptError, match=r"pip install 'rpt\[wandb\]'"):
        require_wandb()


@pytest.mark.slow
def test_train_report_to_wandb_offline_writes_a_readable_run(tmp_path, smollm2_tokenizer):
    wandb = pytest.importorskip("wandb")
    from rptdata.models import local_model_dir
    from tests.rpt_fixtures import write_tasks_dir

    pairs = [
        ("The capital of France is", " Paris"),
        ("One, two, three, four,", " five"),
        ("The sun rises in the", " east"),
        ("Water freezes at zero degrees", " Celsius"),
    ]
    tasks = write_tasks_dir(tmp_path / "tasks", local_model_dir("smollm2-135m"), pairs)
    run = tmp_path / "run"
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_PROJECT": "rpt-test"}
    proc = subprocess.run(
        RPT
        + [
            "train",
            str(tasks),
            "--out",
            str(run),
            "--model",
            "smollm2-135m",
            "--report-to",
            "wandb",
            "--steps",
            "2",
            "--batch-size",
            "2",
            "--group-size",
            "2",
            "--max-new-tokens",
            "1",
            "--prompt-template",
            "continuation",
            "--max-prompt-tokens",
            "64",
            "--sample-every",
            "1",
            "--dynamic-sampling-from",
            "-1",
            "--no-progress",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    history, config, folder = read_offline_run(run)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [h["_step"] for h in history] == [1, 2]
    for h, m in zip(history, metrics):  # the same keys and values as metrics.jsonl
        for key, value in m.items():
            if key != "step" and value is not None:
                assert h[key] == pytest.approx(value), key
    assert sum(h.get("samples/_type") == "table-file" for h in history) == 2  # one table a step (--sample-every 1)
    table = samples_table(folder, 2)
    assert table["columns"] == list(SAMPLE_COLUMNS)
    step2 = [s for s in map(json.loads, (run / "samples.jsonl").read_text().splitlines()) if s["step"] == 2]
    assert table["data"] == [[s.get(c) for c in table["columns"]] for s in step2]
    assert config["report_to"] == "wandb" and config["batch_size"] == 2 and config["model"] == "smollm2-135m"
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert {s["target"] for s in samples} <= {c for _, c in pairs} and all(s["context"] for s in samples)
    assert wandb.__version__ == "0.31.0"
