"""Benchmark `rpt prepare`: throughput against the tokenizer's raw batched encode, and peak RSS.

    make bench-prepare            (or: .venv/bin/python bench/prepare.py [--corpus FILE.jsonl])

Prints, in one run on the same input:
  1. raw encode: the fast tokenizer's `encode_batch_fast` over every text (no offsets, no I/O);
  2. rpt prepare: the whole stage (read JSONL, normalize, tokenize, exact byte spans, verify,
     write Parquet) in tokens/s, and the ratio 2/1 (target >= 0.8);
  3. peak RSS of `rpt prepare` (a fresh process) on the sample and on a corpus 20x larger
     (target: about the same, i.e. memory independent of corpus size).
Default corpus: ../shared/corpora/omnimath-rule.jsonl when present, else builtin:champ exported.
"""

from __future__ import annotations

import argparse
import json
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
    sys.path.insert(0, str(ROOT))
    from rptdata.sources import TextBuilder, expand_inputs, read_source

    path = tmp / "champ.jsonl"
    with path.open("w") as f:
        for rec in read_source(expand_inputs(["builtin:champ"])[0], TextBuilder(template=TEMPLATE)):
            f.write(json.dumps({"problem": rec.text, "solution": ""}) + "\n")
    return path


def run_prepare_process(corpus: Path, out: Path) -> tuple[float, int, dict]:
    """Run `rpt prepare` in a child process; return (seconds, peak RSS in MB, manifest)."""
    code = (
        "import resource, sys, time;"
        "from rptdata.prepare import PrepareConfig, run_prepare;"
        f"t=time.time(); m=run_prepare(PrepareConfig(inputs=({str(corpus)!r},), out={str(out)!r}, template={TEMPLATE!r}, shard_docs=2000, progress=False));"
        "import json; print(json.dumps({'seconds': time.time()-t, 'rss': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, 'counts': m['counts']}))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    info = json.loads(res.stdout.strip().splitlines()[-1])
    return info["seconds"], info["rss"] // 1024, info


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
    from rptdata.prepare import PrepareConfig, run_prepare
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
        t = time.time()
        m = run_prepare(PrepareConfig(inputs=(str(corpus),), out=str(tmp / "out"), template=TEMPLATE, shard_docs=2000, progress=False))
        stage_s = time.time() - t
        n_tok = m["counts"]["tokens"]

        _, rss_small, small_info = run_prepare_process(sample, tmp / "small")
        big = repeat_file(sample, tmp / "big.jsonl", args.scale)
        _, rss_big, big_info = run_prepare_process(big, tmp / "big")

    print(f"throughput corpus: {len(texts):,} documents, {n_tok:,} tokens ({args.repeat} copies of the sample)")
    print(f"{'measure':<46}{'value':>16}")
    print(f"{'raw encode_batch_fast (no offsets, no I/O)':<46}{n_raw / raw_s:>12,.0f} tok/s")
    print(f"{'rpt prepare, whole stage (read..write)':<46}{n_tok / stage_s:>12,.0f} tok/s")
    print(f"{'ratio prepare / raw encode (target >= 0.8)':<46}{(n_tok / stage_s) / (n_raw / raw_s):>16.2f}")
    small_tokens = small_info["counts"]["tokens"]
    print(f"{f'peak RSS, sample ({small_tokens:,} tokens)':<46}{rss_small:>13,} MB")
    big_tokens = big_info["counts"]["tokens"]
    print(f"{f'peak RSS, {args.scale}x larger ({big_tokens:,} tokens)':<46}{rss_big:>13,} MB")
    print(f"{'RSS ratio large/small (target ~1.0)':<46}{rss_big / rss_small:>16.2f}")


if __name__ == "__main__":
    main()
