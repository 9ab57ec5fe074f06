"""Benchmark the memory preflight: its estimate against the measured peak, across shapes.

    make bench-memory            (or: .venv/bin/python bench/memory.py [--cells rpt1-short,ntp-all-long] [--keep])

Each cell is one `rpt train ... --steps 2` run of the embedded model on CPU, as a user runs it
(the CLI in a fresh process, default --max-prompt-tokens and --micro-batch-tokens unless the cell
says otherwise). The run writes RUN/preflight.json: the estimate by part, what it was sized from,
and the measured peak rise of its resident memory over its size when the preflight ran
(`rpttrain.memory_measure.PeakMeter`). The grid:

  objectives  rpt1 (one-token, continuation format), rptN (8 new tokens through transformers'
              generate, then the update), ntp-tasks, ntp-all (every position of the documents)
  contexts    short (make-tasks --context-tokens 96) and long (--context-tokens 1024)
  gradient checkpointing off and on

Prints per cell the estimate, the measured rise and their ratio, and exits 1 when a ratio leaves
rpttrain.memory.ESTIMATE_ERROR (0.5-2.0). States the machine's load: memory does not depend on
it, the run time does.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OMNIMATH = ROOT.parent / "shared" / "corpora" / "omnimath-rule.jsonl"
GIB = 2**30

OBJECTIVES = {
    "rpt1": [
        "--prompt-template",
        "continuation",
        "--max-new-tokens",
        "1",
        "--batch-size",
        "8",
        "--group-size",
        "8",
        "--dynamic-sampling-from",
        "-1",
    ],
    "rptN": [
        "--prompt-template",
        "continuation",
        "--max-new-tokens",
        "8",
        "--batch-size",
        "2",
        "--group-size",
        "4",
        "--dynamic-sampling-from",
        "-1",
    ],
    "ntp-tasks": ["--objective", "ntp", "--ntp-positions", "tasks", "--batch-size", "8"],
    "ntp-all": ["--objective", "ntp", "--ntp-positions", "all", "--batch-size", "4"],
}
CONTEXTS = {"short": 96, "long": 1024}


def rpt(*args: str, **kw) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("rpt")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, **kw)


def build_tasks(work: Path) -> dict[str, Path]:
    """Prepared, scored and task directories for both context lengths (built once, then reused)."""
    prep, scored = work / "prep", work / "scored"
    if OMNIMATH.exists():  # long documents (500-2300 tokens): contexts reach 1024
        corpus = work / "omni8.jsonl"
        if not corpus.exists():  # written once: a rerun resumes the stages on the same input
            corpus.write_text("".join(OMNIMATH.read_text().splitlines(keepends=True)[:8]))
        src = [str(corpus), "--template", r"{problem}\n\n{solution}"]
    else:
        src = ["builtin:champ", "--template", r"{problem}\n\n{solution}", "--max-docs", "40"]
    for args in (
        ["prepare", *src, "--out", str(prep)],
        ["score-entropy", str(prep), "--out", str(scored), "--keep-all", "--max-context", "1024"],
    ):
        done = rpt(*args, "--no-progress")
        if done.returncode:
            raise SystemExit(f"rpt {args[0]} failed:\n{done.stderr[-3000:]}")
    tasks = {}
    for name, ctx in CONTEXTS.items():
        tasks[name] = work / f"tasks-{name}"
        done = rpt(
            "make-tasks",
            str(scored),
            "--out",
            str(tasks[name]),
            "--threshold",
            "0",
            "--context-tokens",
            str(ctx),
            "--eval-fraction",
            "0.2",
            "--seed",
            "1",
            "--no-progress",
        )
        if done.returncode:
            raise SystemExit(f"rpt make-tasks failed:\n{done.stderr[-3000:]}")
    return tasks


def run_cell(tasks: Path, out: Path, objective: str, context: str, checkpointing: bool) -> dict:
    """One `rpt train --steps 2`; returns the estimate, the measured rise and their ratio."""
    # two steps: from the second on, AdamW's state is there while the activations are
    args = [
        "train",
        str(tasks),
        "--out",
        str(out),
        "--model",
        "smollm2-135m",
        "--device",
        "cpu",
        "--steps",
        "2",
        "--no-progress",
        "--overwrite",
        *OBJECTIVES[objective],
    ]
    if objective == "ntp-all":  # windows of the documents: the context length is the window
        args += ["--max-prompt-tokens", str(CONTEXTS[context])]
    if checkpointing:
        args.append("--gradient-checkpointing")
    t0 = time.time()
    done = rpt(*args)
    if done.returncode:
        raise SystemExit(f"cell {objective}/{context}/gc={checkpointing} failed:\n{done.stderr[-3000:]}")
    record = json.loads((out / "preflight.json").read_text())
    est, rise = record["estimate_bytes"]["peak"], record["measured"]["rise_bytes"]
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return {
        "objective": objective,
        "context": context,
        "checkpointing": checkpointing,
        "sequence_tokens": record["sized_from"]["sequence_tokens"],
        "rows": record["sized_from"]["micro_batch_rows"],
        "estimate": est,
        "measured": rise,
        "ratio": est / rise if rise else float("inf"),
        "parts": record["estimate_bytes"],
        "seconds": round(time.time() - t0, 1),
    }


def main() -> None:
    sys.path.insert(0, str(ROOT))
    from rpttrain.memory import ESTIMATE_ERROR

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=str(ROOT / "out" / "bench-memory"), help="Working folder (data kept for reruns).")
    ap.add_argument(
        "--cells", default="", help="Comma-separated OBJECTIVE-CONTEXT[-gc] cells (default: the whole grid)."
    )
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    print(
        f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at start "
        "(memory does not depend on the load; run times do)",
        flush=True,
    )
    tasks = build_tasks(work)
    grid = [(o, c, g) for o in OBJECTIVES for c in CONTEXTS for g in (False, True)]
    if args.cells:
        wanted = set(args.cells.split(","))
        grid = [cell for cell in grid if f"{cell[0]}-{cell[1]}{'-gc' if cell[2] else ''}" in wanted]
    print(
        f"{'cell':<22} {'seq':>5} {'rows':>4} {'estimate GiB':>12} {'measured GiB':>12} {'ratio':>6} {'s':>6}",
        flush=True,
    )
    rows = []
    for objective, context, gc in grid:
        r = run_cell(tasks[context], work / "run", objective, context, gc)
        rows.append(r)
        name = f"{objective}-{context}{'-gc' if gc else ''}"
        print(
            f"{name:<22} {r['sequence_tokens']:>5} {r['rows']:>4} {r['estimate'] / GIB:>12.2f} "
            f"{r['measured'] / GIB:>12.2f} {r['ratio']:>6.2f} {r['seconds']:>6}",
            flush=True,
        )
    lo, hi = ESTIMATE_ERROR
    ratios = [r["ratio"] for r in rows]
    print(
        f"estimate / measured: min {min(ratios):.2f}, max {max(ratios):.2f} over {len(rows)} cells "
        f"(allowed {lo}-{hi}); load average {os.getloadavg()[0]:.2f} at the end"
    )
    (work / "results.json").write_text(json.dumps(rows, indent=1))
    if not all(lo <= x <= hi for x in ratios):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
