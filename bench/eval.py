"""Benchmark `rpt eval`: ntp and reasoning throughput, and ntp against a bare forward pass.

    make bench-eval            (or: .venv/bin/python bench/eval.py [--tasks 64] [--max-new-tokens 16])

On ~64 real tasks cut from CHAMP problems+solutions with the embedded SmolLM2-135M (contexts of
at most --context-tokens tokens, cut with the same helpers as `rpt make-tasks`), in one run:
  1. bare forward: the same contexts, in the same batches (`rptdata.batching.plan_batches`, --batch-size rows),
     left-padded, logits_to_keep=1, nothing else: the limit of the ntp mode;
  2. ntp mode: `run_eval` (tokenize, forward, argmax, model entropy, decode, reward, write the
     predictions), in tasks/s, and the ratio 2/1 (target >= 0.8);
  3. reasoning mode: `run_eval` with the v0 prompt, greedy, a fixed --max-new-tokens, in tasks/s.
Each timed pass runs --repeat times, alternating, and the fastest counts. On a shared machine wall
time is noisy: the CPU time of the process is printed as well (for ntp: the whole run_eval call,
model load and report writing included, so that ratio errs low).
The task entropies come from the bare pass (top-16 of the same model), so the table has bands.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build_tasks(out: Path, tokenizer, n: int, context_tokens: int, seed: int = 0) -> list[dict]:
    """n tasks at random positions of CHAMP documents (one per document), as make-tasks cuts them."""
    from rptdata.sources import TextBuilder, expand_inputs, read_source
    from rptdata.spans import ByteSpanTokenizer
    from rptdata.tasks.taskdef import continuation_at, cut_context, task_id_of

    texts = [(r.doc_id, r.text) for r in read_source(expand_inputs(["builtin:champ"])[0], TextBuilder()) if r.text]
    rng = random.Random(seed)
    rng.shuffle(texts)
    batch = ByteSpanTokenizer(tokenizer).encode_batch([t for _, t in texts])
    tasks = []
    for j, (doc_id, text) in enumerate(texts):
        ends = batch.ends[batch.offsets[j] : batch.offsets[j + 1]]
        if len(ends) < 32:
            continue
        pos = rng.randrange(16, len(ends) - 1)
        try:
            context, n_ctx = cut_context(text.encode(), ends, pos, context_tokens)
            continuation, boundaries = continuation_at(text.encode(), ends, pos, 8)
        except ValueError:  # inside a multi-byte character
            continue
        tasks.append(
            {
                "task_id": task_id_of(doc_id, pos),
                "doc_id": doc_id,
                "pos": pos,
                "context": context,
                "continuation": continuation,
                "boundaries": boundaries,
                "context_tokens": n_ctx,
            }
        )
        if len(tasks) == n:
            break
    return tasks


def write_tasks(out: Path, tasks: list[dict], entropies: list[float], tokenizer) -> Path:
    import pyarrow as pa

    from rptdata.bands import band_of
    from rptdata.io import STAGE_TASKS as STAGE
    from rptdata.models import vocab_hash
    from rptdata.stage import StageDir
    from rptdata.tasks.taskdef import TASKS_SCHEMA

    stage = StageDir(out, STAGE, ["train", "eval"])
    stage.begin({"bench": [t["task_id"] for t in tasks]}, overwrite=True)
    rows = [
        {**t, "entropy": h, "band": band_of(h), "target_id": None, "target_logprob": None, "target_rank": None}
        for t, h in zip(tasks, entropies)
    ]
    stage.write_shard("train", 0, TASKS_SCHEMA.empty_table(), {"tasks": 0})
    stage.write_shard("eval", 0, pa.Table.from_pylist(rows, schema=TASKS_SCHEMA), {"tasks": len(rows)})
    stage.finish(
        {
            "tokenizer": {"name": "smollm2-135m", "spec": "smollm2-135m", "vocab_hash": vocab_hash(tokenizer)},
            "proxy": {"name": "smollm2-135m (bench)"},
        }
    )
    return out


def bare_forward(model, ids: list[list[int]], batch_size: int, pad_id: int):
    """The limit: one forward pass per batch, last position only; returns (wall s, CPU s, last logits)."""
    import torch

    from rptdata.batching import plan_batches

    last = [None] * len(ids)
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.no_grad():
        for batch in plan_batches([len(x) for x in ids], max_rows=batch_size):
            width = max(len(ids[i]) for i in batch)
            x = torch.full((len(batch), width), pad_id, dtype=torch.long)
            attn = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                x[row, width - len(ids[i]) :] = torch.tensor(ids[i])
                attn[row, width - len(ids[i]) :] = 1
            pos = (attn.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=x, attention_mask=attn, position_ids=pos, logits_to_keep=1).logits[:, -1]
            for row, i in enumerate(batch):
                last[i] = logits[row]
    return time.perf_counter() - t0, time.process_time() - c0, last


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=64, help="tasks (one per CHAMP document)")
    ap.add_argument("--context-tokens", type=int, default=64, help="longest context, in tokens")
    ap.add_argument("--batch-size", type=int, default=16, help="contexts per forward pass / prompts per generate call")
    ap.add_argument("--max-new-tokens", type=int, default=16, help="reasoning completion length (fixed budget)")
    ap.add_argument("--reasoning-tasks", type=int, default=None, help="tasks in the reasoning pass (default: all)")
    ap.add_argument("--repeat", type=int, default=3, help="timed passes of bare forward and ntp (the fastest counts)")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    import torch

    from rptdata.models import load_causal_lm, load_tokenizer
    from rptdata.scorers import entropy_from_logits
    from rpttrain.eval import EvalConfig, context_ids, format_table, pad_id, run_eval

    tok = load_tokenizer("smollm2-135m")
    model = load_causal_lm("smollm2-135m", dtype="float32", device="cpu")
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        tasks = build_tasks(tmp / "tasks", tok, args.tasks, args.context_tokens)
        ids = context_ids(tok, [t["context"] for t in tasks], 4096)
        bare_forward(model, ids[: args.batch_size], args.batch_size, pad_id(tok))  # warm-up
        bare_s, bare_cpu, last = bare_forward(model, ids, args.batch_size, pad_id(tok))
        entropies = [float(entropy_from_logits(x, k=16)) for x in last]
        tasks_dir = write_tasks(tmp / "tasks", tasks, entropies, tok)
        common = dict(
            tasks_dir=str(tasks_dir),
            models=("smollm2-135m",),
            device="cpu",
            dtype="float32",
            batch_size=args.batch_size,
            progress=False,
            overwrite=True,
            flush_every=10**6,
        )
        ntp_s = ntp_cpu = float("inf")
        report = None
        for rep in range(args.repeat):
            if rep:
                wall, cpu, _ = bare_forward(model, ids, args.batch_size, pad_id(tok))
                bare_s, bare_cpu = min(bare_s, wall), min(bare_cpu, cpu)
            c0 = time.process_time()
            report = run_eval(EvalConfig(out=str(tmp / "ntp"), mode="ntp", **common))
            ntp_cpu = min(ntp_cpu, time.process_time() - c0)  # the whole call: load, read, loop, report
            ntp_s = min(ntp_s, report["rows"][0]["seconds"])  # the evaluation loop
        n_reason = args.reasoning_tasks or len(tasks)
        reasoning = run_eval(
            EvalConfig(
                out=str(tmp / "reasoning"),
                mode="reasoning",
                limit=n_reason,
                max_new_tokens=args.max_new_tokens,
                **common,
            )
        )
        reason_s = reasoning["rows"][0]["seconds"]

    n = len(tasks)
    tokens = sum(map(len, ids))
    print(
        f"rpt eval benchmark: smollm2-135m fp32 on cpu ({torch.get_num_threads()} threads), {n} CHAMP tasks, "
        f"contexts <= {args.context_tokens} tokens ({tokens:,} in all), batch {args.batch_size}"
    )
    print(f"  bare forward (same contexts and batches, logits_to_keep=1): {bare_s:6.2f} s  {n / bare_s:7.2f} tasks/s")
    print(
        f"  ntp mode (run_eval: tokenize, forward, argmax, entropy, decode, reward, write): {ntp_s:6.2f} s  "
        f"{n / ntp_s:7.2f} tasks/s  ratio {bare_s / ntp_s:.2f} of bare forward (target >= 0.8)"
    )
    print(
        f"  CPU time (robust on a shared machine): bare {bare_cpu:.2f} s, whole ntp run_eval call {ntp_cpu:.2f} s, "
        f"ratio {bare_cpu / ntp_cpu:.2f}"
    )
    print(
        f"  reasoning mode (v0 prompt, greedy, {args.max_new_tokens} new tokens, {n_reason} tasks): {reason_s:6.2f} s  "
        f"{n_reason / reason_s:7.2f} tasks/s"
    )
    print()
    report["rows"] += reasoning["rows"]
    print(format_table(report))


if __name__ == "__main__":
    main()
