"""Benchmark `rpt prepare`: throughput with 1 and 2 processes against the tokenizer's raw batched
encode, and peak RSS per process.

    make bench-prepare            (or: .venv/bin/python bench/prepare.py [--corpus FILE.jsonl])

Prints, in one run on the same input:
  1. raw encode: the fast tokenizer's `encode_batch_fast` over every text (no offsets, no I/O;
     it uses every core through the tokenizer's own thread pool): the limit;
  2. rpt prepare with --processes 1 and --processes 2, each the whole stage in a fresh process
     (index the input, read JSONL, normalize, tokenize, exact byte spans, verify, write Parquet,
     manifest), in tokens/s and as a ratio to 1 (target for 2 processes: >= 0.9);
  3. peak RSS of each process: the stage's process, and with --processes 2 the largest of its
     two workers; on the sample and on a corpus --scale times larger (target: about the same,
     i.e. memory independent of corpus size).
Default corpus: ../shared/corpora/omnimath-rule.jsonl when present, else builtin:champ exported.
"""

from __future__ import annotations

import argparse
import json
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
    sys.path.insert(0, str(ROOT))
    from rptdata.sources import TextBuilder, expand_inputs, read_source

    path = tmp / "champ.jsonl"
    with path.open("w") as f:
        for rec in read_source(expand_inputs(["builtin:champ"])[0], TextBuilder(template=TEMPLATE)):
            f.write(json.dumps({"problem": rec.text, "solution": ""}) + "\n")
    return path


def run_prepare_process(corpus: Path, out: Path, processes: int) -> dict:
    """Run `rpt prepare` in a child process: seconds, peak RSS (MB) of that process and of its
    largest worker process (0 without workers), counts."""
    code = (
        "import json, resource, time;"
        "from rptdata.prepare import PrepareConfig, run_prepare;"
        f"t=time.time(); m=run_prepare(PrepareConfig(inputs=({str(corpus)!r},), out={str(out)!r}, template={TEMPLATE!r}, "
        f"shard_docs=500, processes={processes}, progress=False));"
        "s=time.time()-t; r=resource.getrusage;"
        "print(json.dumps({'seconds': s, 'rss': r(resource.RUSAGE_SELF).ru_maxrss // 1024, "
        "'rss_workers': r(resource.RUSAGE_CHILDREN).ru_maxrss // 1024, 'counts': m['counts']}))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(res.stdout.strip().splitlines()[-1])


def repeat_file(src: Path, dst: Path, times: int) -> Path:
    data = src.read_bytes()
    with dst.open("wb") as f:
        for _ in range(times):
            f.write(data)
    return dst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, default=None)
    ap.add_argument("--repeat", type=int, default=4, help="copies of the corpus in the throughput run")
    ap.add_argument("--scale", type=int, default=20, help="size multiple of the large corpus for the RSS check")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from rptdata.models import load_tokenizer
    from rptdata.sources import TextBuilder, expand_inputs, read_source

    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        sample = args.corpus or sample_corpus(tmp)
        corpus = repeat_file(sample, tmp / "corpus.jsonl", args.repeat)
        texts = [r.text for r in read_source(expand_inputs([str(corpus)])[0], TextBuilder(template=TEMPLATE))]
        backend = load_tokenizer("smollm2-135m").backend_tokenizer
        backend.encode_batch_fast(texts[:64], add_special_tokens=False)  # warm up
        t = time.time()
        n_raw = 0
        for i in range(0, len(texts), 512):
            n_raw += sum(len(e.ids) for e in backend.encode_batch_fast(texts[i : i + 512], add_special_tokens=False))
        raw_s = time.time() - t
        runs = {p: run_prepare_process(corpus, tmp / f"out{p}", p) for p in (1, 2)}
        if runs[1]["counts"] != runs[2]["counts"]:
            sys.exit(f"1 and 2 processes disagree: {runs[1]['counts']} != {runs[2]['counts']}")
        small = run_prepare_process(sample, tmp / "small", 2)
        big = run_prepare_process(repeat_file(sample, tmp / "big.jsonl", args.scale), tmp / "big", 2)

    n_tok = runs[1]["counts"]["tokens"]
    raw = n_raw / raw_s
    print(f"throughput corpus: {len(texts):,} documents, {n_tok:,} tokens ({args.repeat} copies of {sample.name})")
    print(f"{'measure':<58}{'value':>16}")
    print(f"{'raw encode_batch_fast (no offsets, no I/O, all cores)':<58}{raw:>12,.0f} tok/s")
    for p, run in runs.items():
        rate = n_tok / run["seconds"]
        rss = f"{run['rss']:,} MB" + (f", workers {run['rss_workers']:,} MB" if p > 1 else "")
        print(f"{f'rpt prepare --processes {p}, whole stage':<58}{rate:>12,.0f} tok/s")
        target = " (target >= 0.9)" if p == 2 else ""
        print(f"{f'  ratio to raw encode{target}':<58}{rate / raw:>16.2f}")
        print(f"{'  peak RSS per process':<58}{rss:>16}")
    for name, run in ((f"sample, {small['counts']['tokens']:,} tokens", small),
                      (f"{args.scale}x larger, {big['counts']['tokens']:,} tokens", big)):
        print(f"{f'peak RSS, --processes 2, {name}':<58}{run['rss']:>6,} / {run['rss_workers']:,} MB")
    print(f"{'worker RSS ratio large/small (target ~1.0)':<58}{big['rss_workers'] / small['rss_workers']:>16.2f}")


if __name__ == "__main__":
    main()
