"""Benchmark `rpt prepare` against its tokenizer's raw batched encode.

    make bench-prepare            (or: .venv/bin/python bench/prepare.py [--corpus FILE.jsonl] [--copies N])

Input: --copies copies of the corpus (default ../shared/corpora/omnimath-rule.jsonl, 9 copies:
about 11M tokens; builtin:champ exported when that file is absent), --shard-docs records per shard.
Prints, from one run on the same input, with the machine's load average (1 min) beside each figure:
  1. raw encode: `encode_batch_fast` over every text in batches of 512 (no offsets, no I/O, the
     tokenizer's own thread pool on every core): the limit;
  2. `rpt prepare --processes 1`, the whole stage in a fresh process (imports, tokenizer load, index,
     JSON decode, normalize, encode, exact byte spans and their check, Parquet, markers, manifest),
     as a ratio to 1 (target >= 0.6);
  3. one tokenizer thread per process (TOKENIZERS_PARALLELISM=false): `--processes 2` over
     `--processes 1` (target >= 1.6: linear in processes), with the CPU seconds each run took:
     on a loaded machine the wall-clock ratio is the scheduler's share, and twice the CPU-time
     ratio is what two free cores would give;
  4. time to the first shard written, from the launch of the process (target <= 3 s);
  5. peak RSS of each process (with --rss also on a corpus --rss-scale times larger: memory
     independent of corpus size).
On a machine shared with other work the ratios move with the load; rerun when it is quieter.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OMNIMATH = ROOT.parent / "shared" / "corpora" / "omnimath-rule.jsonl"
TEMPLATE = r"{problem}\n\n{solution}"


def sample_corpus(tmp: Path) -> Path:
    if OMNIMATH.exists():
        return OMNIMATH
    from rptdata.sources import TextBuilder, expand_inputs, read_source

    path = tmp / "champ.jsonl"
    with path.open("w") as f:
        for rec in read_source(expand_inputs(["builtin:champ"])[0], TextBuilder(template=TEMPLATE)):
            f.write(json.dumps({"problem": rec.text, "solution": ""}) + "\n")
    return path


def load() -> float:
    return os.getloadavg()[0]


def run_prepare_process(corpus: Path, out: Path, processes: int, shard_docs: int, one_thread: bool) -> dict:
    """`rpt prepare` in a fresh child process: seconds, seconds from launch to the first shard's
    marker, peak RSS (MB) of the process and of its largest worker, counts, load before."""
    code = (
        "import json, resource, time;"
        "from rptdata.prepare import PrepareConfig, run_prepare;"
        f"t=time.time(); m=run_prepare(PrepareConfig(inputs=({str(corpus)!r},), out={str(out)!r}, template={TEMPLATE!r}, "
        f"shard_docs={shard_docs}, processes={processes}, progress=False));"
        "s=time.time()-t; r=resource.getrusage;"
        "print(json.dumps({'seconds': s, 'rss': r(resource.RUSAGE_SELF).ru_maxrss // 1024, "
        "'rss_workers': r(resource.RUSAGE_CHILDREN).ru_maxrss // 1024, 'counts': m['counts']}))"
    )
    env = {**os.environ, **({"TOKENIZERS_PARALLELISM": "false"} if one_thread else {})}
    before, cpu = load(), _cpu_seconds()
    launched = time.time()
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT, env=env)
    wall = time.time() - launched
    cpu = _cpu_seconds() - cpu
    result = json.loads(res.stdout.strip().splitlines()[-1])
    first = min(json.loads(p.read_text())["time"] for p in (out / "done").glob("docs-*.json"))
    return {**result, "wall": wall, "cpu": cpu, "first_shard": first - launched, "load": before}


def _cpu_seconds() -> float:
    """User + system CPU seconds of every finished child process (and theirs) so far."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def repeat_file(src: Path, dst: Path, times: int) -> Path:
    data = src.read_bytes()
    with dst.open("wb") as f:
        for _ in range(times):
            f.write(data)
    return dst


def raw_encode(texts: list[str]) -> tuple[float, int, float]:
    """(seconds, tokens, load before) of the tokenizer's own batched encode over the texts."""
    from rptdata.models import load_plain_tokenizer

    tokenizer = load_plain_tokenizer("smollm2-135m")
    tokenizer.encode_batch_fast(texts[:64], add_special_tokens=False)  # warm up
    before, t, n = load(), time.time(), 0
    for i in range(0, len(texts), 512):
        n += sum(len(e.ids) for e in tokenizer.encode_batch_fast(texts[i : i + 512], add_special_tokens=False))
    return time.time() - t, n, before


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, default=None)
    ap.add_argument("--copies", type=int, default=9, help="copies of the corpus in the throughput runs")
    ap.add_argument("--shard-docs", type=int, default=1000, help="records per shard (--shard-docs of rpt prepare)")
    ap.add_argument("--rss", action="store_true", help="also compare peak RSS on the sample and on --rss-scale copies")
    ap.add_argument("--rss-scale", type=int, default=20)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from rptdata.sources import TextBuilder, expand_inputs, read_source

    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        sample = args.corpus or sample_corpus(tmp)
        corpus = repeat_file(sample, tmp / "corpus.jsonl", args.copies)
        texts = [r.text for r in read_source(expand_inputs([str(corpus)])[0], TextBuilder(template=TEMPLATE))]
        raw_s, n_raw, raw_load = raw_encode(texts)
        runs = {
            name: run_prepare_process(corpus, tmp / name, p, args.shard_docs, one)
            for name, p, one in (("p1", 1, False), ("p1-t1", 1, True), ("p2-t1", 2, True))
        }
        counts = [r["counts"] for r in runs.values()]
        if any(c != counts[0] for c in counts):
            sys.exit(f"the runs disagree: {counts}")
        if args.rss:
            small = run_prepare_process(sample, tmp / "small", 2, args.shard_docs, True)
            big = run_prepare_process(
                repeat_file(sample, tmp / "big.jsonl", args.rss_scale), tmp / "big", 2, args.shard_docs, True
            )

    n_tok = counts[0]["tokens"]
    raw = n_raw / raw_s
    rate = {name: n_tok / r["wall"] for name, r in runs.items()}
    print(
        f"corpus: {len(texts):,} documents, {n_tok:,} tokens ({args.copies} copies of {sample.name}), "
        f"--shard-docs {args.shard_docs}; {os.cpu_count()} CPUs; load = 1-minute load average before each run"
    )
    print(f"{'measure':<66}{'value':>16}{'load':>7}")

    def row(name: str, value: str, load_before: float | None = None) -> None:
        print(f"{name:<66}{value:>16}{'' if load_before is None else f'{load_before:>7.1f}'}")

    row("raw encode_batch_fast (no offsets, no I/O, all cores)", f"{raw:,.0f} tok/s", raw_load)
    row("rpt prepare --processes 1, whole stage, fresh process", f"{rate['p1']:,.0f} tok/s", runs["p1"]["load"])
    row("  ratio to raw encode (target >= 0.6)", f"{rate['p1'] / raw:.2f}")
    row("  time to the first shard written, from launch (target <= 3 s)", f"{runs['p1']['first_shard']:.2f} s")
    row("  peak RSS", f"{runs['p1']['rss']:,} MB")
    row("one tokenizer thread per process: --processes 1", f"{rate['p1-t1']:,.0f} tok/s", runs["p1-t1"]["load"])
    row("one tokenizer thread per process: --processes 2", f"{rate['p2-t1']:,.0f} tok/s", runs["p2-t1"]["load"])
    row("  ratio 2 processes / 1 (target >= 1.6)", f"{rate['p2-t1'] / rate['p1-t1']:.2f}")
    row(
        "  CPU seconds, 1 process / 2 processes (work added by splitting)",
        f"{runs['p1-t1']['cpu']:.1f} / {runs['p2-t1']['cpu']:.1f}",
    )
    row(
        "  ratio if each process had its own core (CPU-time bound)",
        f"{2 * runs['p1-t1']['cpu'] / runs['p2-t1']['cpu']:.2f}",
    )
    row("  peak RSS, largest worker", f"{runs['p2-t1']['rss_workers']:,} MB")
    if args.rss:
        row(f"peak RSS per worker, sample ({small['counts']['tokens']:,} tokens)", f"{small['rss_workers']:,} MB")
        row(f"peak RSS per worker, {args.rss_scale}x larger", f"{big['rss_workers']:,} MB")
        row("  ratio large/small (target ~1.0)", f"{big['rss_workers'] / small['rss_workers']:.2f}")
    print(f"load average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
