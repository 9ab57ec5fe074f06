"""`rpt probe`: per-format signal table, on the tiny model (fast) through the library and the CLI."""

from __future__ import annotations

import json

from click.testing import CliRunner

from cli.main import cli
from rpttrain.probe import ProbeConfig, format_table, run_probe
from tests.rpt_fixtures import rewrite_shard, tiny_llama, write_tasks_dir

PAIRS = [("The quick brown", " fox"), ("over the lazy", " dog"), ("12345", "6"), ("héllo", " wörld")]


def test_probe_rows_are_consistent(tmp_path, tiny_bpe_dir):
    model = tiny_llama(tmp_path / "m", tiny_bpe_dir)
    tasks = write_tasks_dir(tmp_path / "t", str(tiny_bpe_dir), PAIRS)
    rows = run_probe(
        ProbeConfig(
            tasks_dir=str(tasks),
            model=str(model),
            templates=("continuation", "v0"),
            samples=4,
            tasks=4,
            max_new_tokens=6,
            device="cpu",
            out=str(tmp_path / "probe.json"),
        )
    )
    cont, v0 = rows
    assert cont["tasks"] == 4 and cont["max_new_tokens"] == 1 and cont["length_mean"] <= 1.0
    assert cont["boxed"] == 1.0  # the continuation format always yields a prediction
    assert v0["boxed"] == 0.0 and v0["random_at_1"] == 0.0 and v0["signal"] == 0.0  # a random model writes no box
    for r in rows:
        assert 0.0 <= r["random_at_1"] <= r["pass_at_4"] <= 1.0
    assert json.loads((tmp_path / "probe.json").read_text())[0]["template"] == "continuation"
    assert "| continuation | 4 | 1 |" in format_table(rows)


def test_probe_cli(tmp_path, tiny_bpe_dir):
    model = tiny_llama(tmp_path / "m", tiny_bpe_dir)
    tasks = write_tasks_dir(tmp_path / "t", str(tiny_bpe_dir), PAIRS)
    r = CliRunner().invoke(
        cli,
        [
            "probe",
            str(tasks),
            "--model",
            str(model),
            "--prompt-template",
            "continuation",
            "--samples",
            "2",
            "--tasks",
            "2",
            "--device",
            "cpu",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "Random@1" in r.output and "Pass@2" in r.output and "| continuation | 2 |" in r.output
    r = CliRunner().invoke(cli, ["probe", str(tasks), "--model", str(model), "--prompt-template", "v99"])
    assert r.exit_code == 2 and "unknown prompt format" in r.output


def test_plot_cli_writes_png(tmp_path):
    import json

    run = tmp_path / "run"
    run.mkdir()
    rows = [
        {
            "step": i,
            "reward_mean": 0.1 * i,
            "accuracy": 0.1 * i,
            "completion_len_mean": 1,
            "completion_len_max": 1,
            "zero_variance_share": 0.5,
            "rollout_s": 1.0,
            "update_s": 2.0,
            "flops_total": 1e9 * i,
        }
        for i in range(1, 4)
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = CliRunner().invoke(cli, ["plot", str(run)])
    assert r.exit_code == 0, r.output
    png = run / "curves.png"
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 10_000
    r = CliRunner().invoke(cli, ["plot", str(tmp_path)])
    assert r.exit_code == 1 and "no metrics.jsonl" in r.output


def test_probe_shows_the_predicted_share_beside_the_observed_one(tmp_path, tiny_bpe_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rptdata.io import list_shards

    model = tiny_llama(tmp_path / "m", tiny_bpe_dir)
    tasks = write_tasks_dir(tmp_path / "t", str(tiny_bpe_dir), PAIRS)
    config = ProbeConfig(
        tasks_dir=str(tasks), model=str(model), templates=("continuation",), samples=4, tasks=4, device="cpu"
    )
    assert run_probe(config)[0]["predicted_signal"] is None  # tasks without the estimate: no prediction
    (shard,) = list_shards(tasks / "train")
    t = pq.read_table(shard)
    t = t.set_column(
        t.schema.get_field_index("accept_mass"), "accept_mass", pa.array([0.5, 0.5, 0.0, 1.0], pa.float32())
    )
    rewrite_shard(tasks, shard, t)
    row = run_probe(config)[0]
    assert row["predicted_signal"] == 0.4375  # mean of 1 - q^4 - (1-q)^4: 0.875, 0.875, 0, 0
    assert format_table([row]).endswith(f"| {100 * row['signal']:.0f}% | 44% |")
