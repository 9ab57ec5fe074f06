"""`rpt train --backend trl` (rpttrain/backends/trl.py) and the option check of every backend
(rpttrain/backends/__init__.py): TRL 1.16.0's GRPOTrainer trains the embedded model on this CPU,
writes the rpt run layout, and resumes a killed run through TRL's own checkpoint.

Run: .venv/bin/python -m pytest -q tests/test_backends_trl.py   (-m "not slow" for the quick ones)
"""

from __future__ import annotations

import doctest
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rpttrain import backends
from rpttrain.backends import BackendOptionError, check_backend, run_backend, unsupported_options
from rpttrain.config import TrainConfig
from tests.rpt_fixtures import tiny_train_config, write_tasks_dir

ROOT = Path(__file__).resolve().parents[1]
# short prompts whose one-token continuation SmolLM2 gets sometimes right at T = 1: mixed groups
PAIRS = [
    ("1, 2, 3, 4, 5,", " 6"),
    ("The capital of France is", " Paris"),
    ("Monday, Tuesday,", " Wednesday"),
    ("She opened the", " door"),
]


def test_doctests():
    from rpttrain.backends import trl, verl, verl_agent_loop

    for module in (backends, trl, verl, verl_agent_loop):
        assert doctest.testmod(module).failed == 0, module.__name__


def test_unhonoured_options_are_refused_by_name():
    config = TrainConfig("t", "o", objective="ntp", max_bad_steps=3, dynamic_sampling_rounds=1, lr=1e-5, beta=0.5)
    assert unsupported_options(config, "trl") == ["objective", "dynamic_sampling_rounds", "max_bad_steps"]
    assert unsupported_options(config, "verl") == ["objective", "dynamic_sampling_rounds", "max_bad_steps"]
    assert unsupported_options(TrainConfig("t", "o", sample_every=3, compute_budget=1e9), "verl") == [
        "sample_every",
        "compute_budget",
    ]
    assert unsupported_options(TrainConfig("t", "o", sample_every=3, compute_budget=1e9), "trl") == []
    with pytest.raises(BackendOptionError, match=r"max_bad_steps \(--max-bad-steps=3\)"):
        check_backend(config, "trl")
    with pytest.raises(BackendOptionError, match="one process on one device"):
        run_backend(TrainConfig("t", "o"), "rpt", gpus_per_node=2)
    with pytest.raises(BackendOptionError, match="unknown backend"):
        run_backend(TrainConfig("t", "o"), "deepspeed")


def test_accelerate_config_and_launch_script(tmp_path):
    from rpttrain.backends.trl import grpo_args, launch_command

    run = tmp_path / "run"
    run.mkdir()
    command = launch_command(run, "fsdp", 8, 2, "bf16", cpu=False, resume=True)
    script = Path(command[1]).read_text()
    assert "--config_file" in script and "MACHINE_RANK" in script and script.rstrip().endswith("--resume")
    import yaml

    cfg = yaml.safe_load((run / "accelerate.yaml").read_text())
    assert (cfg["distributed_type"], cfg["num_processes"], cfg["num_machines"]) == ("FSDP", 16, 2)
    with pytest.raises(BackendOptionError, match="needs GPUs"):
        launch_command(run, "zero3", 2, 1, "no", cpu=True, resume=False)
    with pytest.raises(BackendOptionError, match="split evenly"):
        grpo_args(TrainConfig("t", "o", batch_size=3, group_size=3), world_size=2)


def _config(tmp_path: Path, **over) -> TrainConfig:
    tasks = write_tasks_dir(tmp_path / "tasks", "smollm2-135m", PAIRS)
    options = dict(
        steps=2,
        batch_size=2,
        group_size=4,
        micro_batch_tokens=4096,
        keep_checkpoints=3,
        dynamic_sampling_from=0,
        lr=1e-4,
        weight_decay=0.0,
        sample_every=1,
        seed=0,
    )
    return tiny_train_config(tasks, "smollm2-135m", tmp_path / "run", **{**options, **over})


def _max_weight_change(a_spec: str, b_spec: str) -> float:
    from rptdata.models import load_causal_lm

    a, b = load_causal_lm(a_spec).state_dict(), load_causal_lm(b_spec).state_dict()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.slow
def test_trl_trains_is_killed_and_resumes_from_its_checkpoint(tmp_path):
    from rpttrain.backends.trl import prepare_run
    from rpttrain.checkpoint import list_checkpoints
    from rpttrain.eval import read_run
    from rpttrain.plot import plot_run

    config = _config(tmp_path)
    run = prepare_run(config, resume=False, overwrite=False)
    # the entry point `accelerate launch` runs in every process; killed once step 1 is checkpointed
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen(
        [sys.executable, "-m", "rpttrain.backends.trl", str(run)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 900
    while not list_checkpoints(run) and child.poll() is None and time.time() < deadline:
        time.sleep(1)
    child.kill()
    _, err = child.communicate()
    checkpoints = list_checkpoints(run)
    assert checkpoints and checkpoints[0].name == "step-000001", err.decode()[-2000:]

    with pytest.raises(Exception, match="--resume"):
        run_backend(config, "trl")
    summary = run_backend(config, "trl", resume=True)
    assert summary["steps"] == 2 and summary["totals"]["flops"] > 0

    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        assert 0.0 <= m["reward_mean"] <= 1.0 and m["reward_mean"] == m["accuracy"]
        # dynamic sampling from step 0: only groups with mixed rewards are trained
        assert m["groups_trained"] == round(config.batch_size * (1 - m["zero_variance_share"]))
    assert metrics[1]["flops_total"] > metrics[0]["flops_total"]
    state = json.loads((run / "trl" / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and [h["step"] for h in state["log_history"] if "loss" in h] == [1, 2]

    # what rpt eval --checkpoints and rpt plot read
    info = read_run(run)
    assert [c[0] for c in info.checkpoints] == [1, 2] and info.checkpoints[1][2] == metrics[1]["flops_total"]
    assert plot_run(run).exists()
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == {1, 2}

    change = _max_weight_change("smollm2-135m", str(checkpoints[0]))
    if metrics[0]["zero_variance_share"] < 1:
        assert change > 0  # a group with mixed rewards moved the policy
    else:
        assert change == 0  # no signal, no weight decay: nothing moves


@pytest.mark.slow
def test_two_processes_through_accelerate_on_cpu(tmp_path):
    """accelerate's `--cpu` launcher starts one process whatever --num_processes says; the generated
    config starts two (torchrun) that join a gloo group, and they train one step together."""
    config = _config(tmp_path, steps=1)
    summary = run_backend(config, "trl", gpus_per_node=2, launch=True)
    assert summary["processes"] == 2 and summary["steps"] == 1
    assert "accelerate.commands.launch" in Path(config.out, "launch-trl.sh").read_text()
    (line,) = [json.loads(x) for x in Path(config.out, "metrics.jsonl").read_text().splitlines()]
    assert line["step"] == 1 and 0.0 <= line["reward_mean"] <= 1.0


def test_resume_takes_the_last_complete_checkpoint_and_drops_a_half_written_one(tmp_path):
    """A run killed while TRL wrote checkpoint-2 resumes from checkpoint-1 (the last with the
    state.json written after everything else); the half-written folder is removed."""
    from rpttrain.backends.trl import _last_trl_checkpoint

    for n, files in (
        (1, ("model.safetensors", "trainer_state.json", "state.json")),
        (2, ("model.safetensors",)),
        (10, ("trainer_state.json",)),
    ):
        folder = tmp_path / "trl" / f"checkpoint-{n}"
        folder.mkdir(parents=True)
        for name in files:
            (folder / name).write_text("{}")
    assert _last_trl_checkpoint(tmp_path) == tmp_path / "trl" / "checkpoint-1"
    assert sorted(p.name for p in (tmp_path / "trl").iterdir()) == ["checkpoint-1"]
    assert _last_trl_checkpoint(tmp_path / "nothing") is None
