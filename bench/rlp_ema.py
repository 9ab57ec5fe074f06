"""What RLP's EMA baseline costs a step, in memory and time, measured on the embedded model.

    .venv/bin/python bench/rlp_ema.py TASKS [--steps 3] [--max-new-tokens 32]

TASKS: a make-tasks directory built with the embedded model's tokenizer (e.g. `make demo`'s
out/demo/tasks). What it prints, each measured in this run:
  memory  the resident-memory rise of the EMA copy (`rpttrain.objectives.rlp.ema_copy`) against
          the preflight's term for it (N x 4 bytes, `rpttrain.memory`);
  time    an `rpt train --objective rlp` run's seconds per step after the first: the EMA's scoring
          forward (`ema_score_s`) and its update (`ema_s`), against the whole step (`step_s`);
  the machine's load average, since a shared machine makes single timings noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("tasks")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    args = ap.parse_args()

    import torch

    from rptdata.models import load_causal_lm
    from rpttrain.objectives.rlp import ema_copy, ema_update

    model = load_causal_lm("smollm2-135m", dtype="float32", device="cpu")
    n = sum(p.numel() for p in model.parameters())
    # the weights load lazily (memory-mapped): read them all first, so the rise is the copy's alone
    float(sum(p.detach().double().sum() for p in model.parameters()))
    before = rss_bytes()
    ema = ema_copy(model, None)
    rise = rss_bytes() - before
    print(f"memory: EMA copy {rise / 2**20:.0f} MiB resident; preflight term N x 4 = {n * 4 / 2**20:.0f} MiB")
    # 272 tensors, one op each: on a loaded machine each op's OpenMP team waits for its threads,
    # so the thread count matters more than the arithmetic; both are printed
    threads = torch.get_num_threads()
    for count in sorted({1, threads}):
        torch.set_num_threads(count)
        t = time.perf_counter()
        for _ in range(3):
            ema_update(ema, model, 0.999)
        print(f"ema_update alone, {count} thread(s): {(time.perf_counter() - t) / 3:.3f} s ({n / 1e6:.0f}M parameters)")
    torch.set_num_threads(threads)

    out = Path(tempfile.mkdtemp(prefix="rlp-ema-")) / "run"
    rpt = str(Path(sys.executable).with_name("rpt"))
    cmd = [rpt, "train", args.tasks, "--out", str(out), "--objective", "rlp", "--model", "smollm2-135m"]
    cmd += ["--device", "cpu", "--steps", str(args.steps), "--batch-size", "2", "--group-size", "4"]
    cmd += ["--max-new-tokens", str(args.max_new_tokens), "--max-prompt-tokens", "128", "--lr", "1e-6"]
    cmd += ["--save-every", str(args.steps), "--no-progress", "--report-to", "none"]
    subprocess.run(cmd, check=True)
    logged = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = logged[1:] or logged  # after the first step, which pays one-off warm-up, when there are more
    mean = {k: statistics.mean(m[k] for m in steps) for k in ("ema_score_s", "ema_s", "score_s", "step_s")}
    share = (mean["ema_score_s"] + mean["ema_s"]) / mean["step_s"]
    print(
        f"time per step (mean of {len(steps)} step(s)): EMA scoring forward {mean['ema_score_s']:.3f} s + EMA update "
        f"{mean['ema_s']:.3f} s of a {mean['step_s']:.2f} s step ({share:.1%})"
    )
    record = json.loads((out / "preflight.json").read_text())
    print(f"preflight: {json.dumps({k: record['estimate_bytes'].get(k) for k in ('ema', 'peak')})}")
    print(f"load average: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
