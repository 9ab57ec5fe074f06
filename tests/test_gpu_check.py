"""`make gpu-check` in its CPU dry run: the same steps on a tiny Qwen2 shape, with the packages the GPU
machine lacks (duckdb, datasets, gguf) blocked (`.venv/bin/python -m pytest -q tests/test_gpu_check.py`)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import OMNIMATH, QWEN_TOKENIZER

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_dry_run_on_cpu(tmp_path):
    if not (QWEN_TOKENIZER.exists() and OMNIMATH.exists()):
        pytest.skip("../shared (R1-Distill-Qwen tokenizer, Omni-MATH) is not present")
    bundle = tmp_path / "bundle"
    shutil.copytree(QWEN_TOKENIZER, bundle / "tokenizer")
    (bundle / "corpora").mkdir()
    lines = OMNIMATH.read_text().splitlines()[:60]
    (bundle / "corpora" / "omnimath.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "gpu_check.py"),
            "--device",
            "cpu",
            "--dry-run",
            "--bundle",
            str(bundle),
            "--out",
            str(out),
            "--tokens",
            "5000",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-2000:]
    figures = json.loads((out / "gpu_check.json").read_text())
    assert figures["dry_run"] and figures["ok"]
    assert figures["score"]["positions"] > 3000 and figures["score"]["tokens_per_s"] > 0
    assert 0 < figures["score"]["ratio_to_bare_forward"] and figures["score"]["mfu"] > 0
    precision = figures["precision"]
    assert precision["weights_moved"] and precision["pure_bf16_collapses"]
    assert figures["train"]["resume_equal"] and figures["train"]["master_dtype"] == "torch.float32"
    memory = figures["train"]["memory"]
    assert memory["estimate_gib"] > 0 and memory["measured_gib"] > 0 and memory["estimate_over_measured"] > 0, memory
    assert figures["eval"]["rows"], figures["eval"]
