"""One prepared GPU check of `rpt` (`make gpu-check`): scoring throughput, training that learns at
lr 1e-6 in bf16 compute, exact resume and eval, on a DeepSeek-R1-Distill-Qwen-1.5B-shaped policy.

    make gpu-check-bundle                                    # here: copy tokenizer + corpora into .gpu-check/
    python3 bench/gpu_check.py --out .gpu-check/out          # there: the GPU machine (about 5-8 min on one H200)
    python3 bench/gpu_check.py --device cpu --dry-run --out /tmp/gc   # anywhere: a tiny shape, same steps (CI-safe)

It needs only torch, transformers, safetensors, pyarrow, click, tqdm, pyyaml and accelerate (what
the GPU machine has): no duckdb, datasets or gguf (the dry run blocks them to prove it), no network,
and the R1-Distill-Qwen tokenizer and the corpora from `.gpu-check/` (git-ignored; `make
gpu-check-bundle` fills it from ../shared, which does not travel).

Steps (each stage runs through the `rpt` CLI in this process, so its peak GPU memory is measured):
  a. a Qwen2 policy with DeepSeek-R1-Distill-Qwen-1.5B's published shape (random weights, seeded),
     `rpt prepare` + `rpt score-entropy` over --tokens tokens: tokens/s, MFU (2 N FLOPs a token over
     --peak-tflops) and the ratio to a bare bf16 forward over the same number of tokens
  b. three 3-step next-token runs at lr 1e-6 (fp32, bf16 compute + fp32 master, pure bf16): the
     norm of the master-weight change of the mixed run against the fp32 run's (target 0.5-2x) and
     of the pure-bf16 run (the lost-update collapse); then 3 `rpt train` GRPO steps (HF engine,
     bf16 compute, lr 1e-6) against 2 steps + `--resume`: step 3's metrics and master weights equal;
     the memory preflight's estimate (RUN/preflight.json) beside the measured peak
  c. `rpt eval --mode ntp` on the last checkpoint
Writes OUT/gpu_check.json with every figure, and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QWEN_1_5B = dict(
    vocab_size=151936,
    hidden_size=1536,
    intermediate_size=8960,
    num_hidden_layers=28,
    num_attention_heads=12,
    num_key_value_heads=2,
    max_position_embeddings=131072,
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)
TINY = dict(
    QWEN_1_5B,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
)
MISSING_ON_GPU_MACHINE = ("duckdb", "datasets", "gguf")


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", required=True, help="folder for the work files and gpu_check.json")
    p.add_argument("--device", default="cuda", help="cuda (the check) or cpu (with --dry-run)")
    p.add_argument("--dry-run", action="store_true", help="a tiny model and corpus, and duckdb/datasets/gguf blocked")
    p.add_argument(
        "--bundle", default=str(ROOT / ".gpu-check"), help="folder with tokenizer/ and corpora/ (make gpu-check-bundle)"
    )
    p.add_argument("--tokens", type=int, default=None, help="corpus tokens to score (default 3M; dry run 5k)")
    p.add_argument(
        "--peak-tflops", type=float, default=790.0, help="bf16 peak the MFU is taken against (H200 measured: ~790)"
    )
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def block_missing_packages() -> None:
    """Make the packages the GPU machine lacks unimportable, as they are there."""
    for name in MISSING_ON_GPU_MACHINE:
        sys.modules[name] = None  # `import name` now raises ImportError


def rpt(*args: str) -> None:
    """Run one `rpt` command in this process (click raises on failure instead of exiting)."""
    from cli.main import cli

    cli.main(args=[str(a) for a in args], standalone_mode=False)


class Peak:
    """Peak GPU memory of a block (0 on CPU)."""

    def __init__(self, device: str):
        self.device, self.gib = device, 0.0

    def __enter__(self):
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc):
        import torch

        if self.device.startswith("cuda"):
            self.gib = round(torch.cuda.max_memory_allocated() / 2**30, 2)


def build_policy(folder: Path, tokenizer_dir: Path, shape: dict, seed: int) -> int:
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(seed)
    config = Qwen2Config(**shape, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def write_corpus(path: Path, corpora: Path, tokens: int) -> int:
    """JSONL of `text` records from the bundled corpora, cycled (with a pass number, so no two
    records are equal) until about `tokens` tokens (4 characters a token)."""
    records = []
    for src in sorted(corpora.glob("*.jsonl")):
        for line in src.read_text().splitlines():
            row = json.loads(line)
            parts = [row.get(k) for k in ("problem", "solution", "question", "answer") if row.get(k)]
            if parts:
                records.append("\n\n".join(parts))
    if not records:
        raise SystemExit(f"no corpus records under {corpora}: run `make gpu-check-bundle` first")
    chars, n = 0, 0
    with path.open("w") as f:
        while chars < 4 * tokens:
            text = f"[{n // len(records)}] " + records[n % len(records)]
            f.write(json.dumps({"text": text}) + "\n")
            chars += len(text)
            n += 1
    return n


def bare_forward_tokens_per_s(policy: Path, device: str, tokens: int, window: int) -> float:
    """A bf16 forward over `tokens` random tokens in [rows, window] batches with the LM head on
    every position (the work a scorer cannot avoid, nothing after it), after one warm-up batch."""
    import torch

    from rptdata.models import load_causal_lm

    model = load_causal_lm(str(policy), dtype="bfloat16" if device.startswith("cuda") else "float32", device=device)
    rows = 16 if device.startswith("cuda") else 2
    batch = torch.randint(0, model.config.vocab_size, (rows, window), device=device)
    with torch.no_grad():
        model(input_ids=batch)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        done, t0 = 0, time.time()
        while done < tokens:
            model(input_ids=batch)
            done += batch.numel()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    del model
    return done / (time.time() - t0)


def weight_change(tasks: Path, out: Path, policy: Path, device: str, compute: str, master: str, steps: int = 3) -> dict:
    import torch

    from rpttrain.config import TrainConfig
    from rpttrain.train import Trainer

    config = TrainConfig(
        tasks_dir=str(tasks),
        out=str(out),
        model=str(policy),
        objective="ntp",
        ntp_positions="tasks",
        steps=steps,
        batch_size=16 if device.startswith("cuda") else 4,
        max_prompt_tokens=256,
        lr=1e-6,
        grad_clip=1.0,
        weight_decay=0.0,
        micro_batch_tokens=8192,
        device=device,
        compute_dtype=compute,
        master_dtype=master,
        progress=False,
        seed=0,
    )
    with Peak(device) as peak:
        trainer = Trainer(config)
        trainer.setup(resume=False, overwrite=True)
        before = [p.detach().float().cpu().clone() for p in trainer.model.parameters()]  # a copy, also of fp32 on CPU
        t0 = time.time()
        for _ in range(steps):
            trainer.train_step()
        seconds = time.time() - t0
        sq = changed = total = 0.0
        for b, p in zip(before, trainer.model.parameters()):
            d = p.detach().float().cpu() - b
            sq += float((d * d).sum())
            changed += float((d != 0).sum())
            total += d.numel()
        del trainer
        torch.cuda.empty_cache() if device.startswith("cuda") else None
    return {
        "norm": sq**0.5,
        "share_changed": changed / total,
        "seconds_per_step": seconds / steps,
        "peak_gib": peak.gib,
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.dry_run:
        block_missing_packages()
    import torch
    import transformers

    if args.device.startswith("cuda"):
        # resume equality on a GPU needs deterministic kernels (embedding backward, cuBLAS workspaces)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    out = Path(args.out).resolve()
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    bundle = Path(args.bundle)
    tokens = args.tokens or (5_000 if args.dry_run else 3_000_000)
    shape = TINY if args.dry_run else QWEN_1_5B
    window = 256 if args.dry_run else 1024
    # bf16 on the GPU; on a CPU a full softmax in bf16 is slow and proves nothing the GPU run needs
    score_dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    figures: dict = {
        "device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "dry_run": args.dry_run,
        "shape": shape,
    }
    started = time.time()

    # -- a. scoring --------------------------------------------------------------------------------
    policy = work / "policy"
    figures["n_params"] = n = build_policy(policy, bundle / "tokenizer", shape, args.seed)
    corpus = work / "corpus.jsonl"
    figures["corpus_records"] = write_corpus(corpus, bundle / "corpora", tokens)
    t0 = time.time()
    rpt("prepare", corpus, "--tokenizer", policy, "--out", work / "prep", "--overwrite", "--no-progress")
    figures["prepare_s"] = round(time.time() - t0, 1)
    with Peak(args.device) as peak:
        rpt(
            "score-entropy",
            work / "prep",
            "--model",
            policy,
            "--out",
            work / "scored",
            "--dtype",
            score_dtype,
            "--device",
            args.device,
            "--max-context",
            window,
            "--keep-all",
            "--overwrite",
            "--no-progress",
        )
    scored = json.loads((work / "scored" / "manifest.json").read_text())
    scored_tokens = int(scored["counts"].get("positions_scored") or scored["counts"].get("positions") or 0)
    score_tps = scored_tokens / max(float(scored["seconds"]), 1e-9)
    bare_tps = bare_forward_tokens_per_s(policy, args.device, min(scored_tokens, 2_000_000), window)
    figures["score"] = {
        "positions": scored_tokens,
        "seconds": scored["seconds"],
        "tokens_per_s": round(score_tps),
        "bare_forward_tokens_per_s": round(bare_tps),
        "ratio_to_bare_forward": float(f"{score_tps / bare_tps:.3g}"),
        "mfu": float(f"{score_tps * 2 * n / (args.peak_tflops * 1e12):.3g}"),
        "peak_gib": peak.gib,
        "counts": scored["counts"],
    }

    # -- b. training -------------------------------------------------------------------------------
    tasks = work / "tasks"
    # A tenth of the documents is held out; a small corpus (the dry run's few records) holds out
    # more, so step c always has an eval split to read.
    eval_fraction = max(0.1, min(0.5, 4 / figures["corpus_records"]))
    rpt(
        "make-tasks",
        work / "scored",
        "--out",
        tasks,
        "--threshold",
        "0",
        "--context-tokens",
        256,
        "--eval-fraction",
        eval_fraction,
        "--max-eval-tasks",
        64,
        "--seed",
        1,
        "--overwrite",
    )
    runs = {
        name: weight_change(tasks, work / f"ntp-{name}", policy, args.device, compute, master)
        for name, compute, master in (
            ("fp32", "float32", "float32"),
            ("bf16_mixed", "bfloat16", "float32"),
            ("bf16_pure", "bfloat16", "bfloat16"),
        )
    }
    mixed_ratio = runs["bf16_mixed"]["norm"] / max(runs["fp32"]["norm"], 1e-30)
    pure_ratio = runs["bf16_pure"]["norm"] / max(runs["fp32"]["norm"], 1e-30)
    figures["precision"] = {
        **runs,
        "mixed_over_fp32": round(mixed_ratio, 3),
        "pure_over_fp32": round(pure_ratio, 4),
        "weights_moved": 0.5 < mixed_ratio < 2.0,
        "pure_bf16_collapses": pure_ratio < 0.25,
    }

    train = [
        "--model",
        policy,
        "--prompt-template",
        "v0",
        "--max-new-tokens",
        8 if args.dry_run else 64,
        "--max-prompt-tokens",
        256,
        "--batch-size",
        4 if args.dry_run else 16,
        "--group-size",
        4 if args.dry_run else 8,
        "--lr",
        "1e-6",
        "--compute-dtype",
        "bfloat16",
        "--engine",
        "hf",
        "--device",
        args.device,
        "--dynamic-sampling-from",
        -1,
        "--save-every",
        1,
        "--keep-checkpoints",
        3,
        "--micro-batch-tokens",
        16384,
        "--no-progress",
    ]
    with Peak(args.device) as peak:
        t0 = time.time()
        rpt("train", tasks, "--out", work / "rpt-whole", "--steps", 3, "--overwrite", *train)
        whole_s = time.time() - t0
    rpt("train", tasks, "--out", work / "rpt-part", "--steps", 2, "--overwrite", *train)
    rpt("train", tasks, "--out", work / "rpt-part", "--steps", 3, "--resume", *train)
    figures["train"] = {
        "seconds_3_steps": round(whole_s, 1),
        "peak_gib": peak.gib,
        **compare_runs(work / "rpt-whole", work / "rpt-part"),
    }
    figures["train"]["memory"] = preflight_figures(work / "rpt-whole")

    # -- c. eval -----------------------------------------------------------------------------------
    from rpttrain.checkpoint import list_checkpoints

    last = list_checkpoints(work / "rpt-whole")[-1]
    t0 = time.time()
    rpt(
        "eval",
        tasks,
        "--model",
        last,
        "--mode",
        "ntp",
        "--out",
        work / "report",
        "--device",
        args.device,
        "--dtype",
        score_dtype,
        "--overwrite",
        "--no-progress",
    )
    report = json.loads((work / "report" / "report.json").read_text())
    figures["eval"] = {"seconds": round(time.time() - t0, 1), "rows": report.get("rows", [])[:4]}
    figures["total_s"] = round(time.time() - started, 1)
    figures["ok"] = bool(
        figures["precision"]["weights_moved"]
        and figures["precision"]["pure_bf16_collapses"]
        and figures["train"]["resume_equal"]
    )
    (out / "gpu_check.json").write_text(json.dumps(figures, indent=2, default=str))
    print(json.dumps(figures, indent=2, default=str))
    return figures


def compare_runs(whole: Path, part: Path) -> dict:
    """Step 3 of an uninterrupted run against 2 steps + --resume: metrics and master weights."""
    from safetensors.torch import load_file

    from rpttrain.checkpoint import MASTER_WEIGHTS, list_checkpoints

    def step3(run):
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return {k: v for k, v in rows[2].items() if not k.endswith("_s") and k != "rollout_tokens_per_s"}

    a, b = (load_file(str(list_checkpoints(r)[-1] / MASTER_WEIGHTS)) for r in (whole, part))
    max_diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    ma, mb = step3(whole), step3(part)
    return {
        "metrics_equal": ma == mb,
        "master_max_abs_diff": max_diff,
        "resume_equal": ma == mb and max_diff == 0.0,
        "step3": ma,
        "rewards_mean": ma.get("reward_mean"),
        "master_dtype": str(next(iter(a.values())).dtype),
    }


def preflight_figures(run: Path) -> dict:
    """The run's own RUN/preflight.json: the estimate (sized from its tasks), the measured peak rise
    (on CUDA, the allocator's max_memory_reserved) and their ratio."""
    record = json.loads((run / "preflight.json").read_text())
    measured = record.get("measured", {})
    return {
        "estimate_gib": round(record["estimate_bytes"]["peak"] / 2**30, 2),
        "measured_gib": round(measured.get("rise_bytes", 0) / 2**30, 2),
        "measured_what": measured.get("what"),
        "estimate_over_measured": measured.get("estimate_over_measured"),
        "attention_kernel": record["sized_from"]["attention"],
        "sequence_tokens": record["sized_from"]["sequence_tokens"],
    }


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
