"""`rpt train --backend trl`: TRL's GRPOTrainer on rpt's tasks, prompts, reward and run layout.

    run_trl(config)                                        # one process, here (CPU or one GPU)
    run_trl(config, gpus_per_node=8, launch=True)          # accelerate launch, DDP over 8 GPUs
    run_trl(config, gpus_per_node=8, sharding="fsdp")      # writes the config and script, returns the command
    python -m rpttrain.backends.trl RUN [--resume]         # what the script runs in every process

How each TrainConfig option maps (`grpo_args`); anything else is refused when set (HONOURED):
    batch_size B, group_size G  generation_batch_size = B*G completions per optimizer step, split
                                into per_device_train_batch_size x gradient_accumulation_steps x
                                processes (steps_per_generation = accumulation: one on-policy update
                                per batch, as in the paper); micro_batch_tokens bounds the per-device
                                batch by (max_prompt_tokens + max_new_tokens) tokens a row
    temperature, top_p          the same; max_new_tokens -> max_completion_length
    max_prompt_tokens, prompt_template   rendered and cut by rpt (`RptGRPOTrainer._tokenize_prompts`)
    reward                      `RptReward` (rpttrain/backends/trl_grpo.py), logged as rewards/rpt/mean
    kl_coef -> beta (k3 KL to the initial model, 0 loads none); clip_eps, clip_eps_high -> epsilon,
    epsilon_high; scale_rewards group|none; loss_agg token-mean|seq-mean|dr-grpo -> loss_type
    dapo|grpo|dr_grpo; lr, adam betas, weight_decay, grad_clip -> max_grad_norm, warmup_steps
    (then constant, as rpt)
    dynamic_sampling_from       all-equal groups masked out of the loss from that step (no refill;
                                dynamic_sampling_rounds is not used, a value other than the default
                                is refused)
    engine hf|auto -> transformers generate; vllm -> use_vllm, colocated, vllm_gpu_memory_utilization
    dtype (compute), device, gradient_checkpointing, seed, save_every, keep_checkpoints,
    sample_every, compute_budget (stop with a checkpoint), trust_remote_code: the same meaning
    report_to                   TRL's report_to, the same names (tensorboard only when installed)

The run directory is the rpt backend's: config.yaml, metrics.jsonl (same keys where TRL logs them,
plus the raw TRL line under "trl"), samples.jsonl, summary.json, and checkpoints/step-N, each a
link to TRL's own checkpoint RUN/trl/checkpoint-N (HF weights + tokenizer + optimizer, scheduler,
RNG and trainer state) holding a state.json with the cumulative FLOPs; a resume continues from
TRL's newest checkpoint through TRL's own `resume_from_checkpoint`. FLOPs count 2N per token the
rollout runs and 6N per token the update runs, every sample's prompt + completion (TRL generates
and trains each of a group's G copies of the prompt).

Left out on purpose: refilling the batch under dynamic sampling, skipping non-finite updates
(max_bad_steps), the ntp objectives, and saving on SIGTERM (TRL saves every save_every steps).
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rptdata.io import (
    STAGE_TRAIN,
    TASK_STAGES,
    fingerprint,
    list_shards,
    read_manifest,
    truncate_jsonl,
    write_json_atomic,
    write_text_atomic,
)
from rptdata.stage import claim_run_dir
from rpttrain.backends import HONOURED_BY_BOTH, IRRELEVANT_TO_RPT, BackendOptionError
from rpttrain.backends.trl_launch import SHARDINGS, accelerate_config, launch_command
from rpttrain.data import DATA_CACHE
from rpttrain.preflight import PREFLIGHT, RunPreflight
from rpttrain.report_to import trl_report_to

log = logging.getLogger(__name__)

__all__ = ["HONOURED", "SHARDINGS", "accelerate_config", "grpo_args", "run_trl", "train_trl"]

HONOURED = HONOURED_BY_BOTH | {"compute_budget", "sample_every"} | IRRELEVANT_TO_RPT

LOSS_TYPES = {"token-mean": "dapo", "seq-mean": "grpo", "dr-grpo": "dr_grpo"}
TRL_DIR = "trl"  # TRL's output_dir inside the run: checkpoint-N folders
OWN_FILES = (
    "config.yaml",
    "backend.json",
    "metrics.jsonl",
    "samples.jsonl",
    "summary.json",
    "accelerate.yaml",
    "launch-trl.sh",
    "checkpoints",
    TRL_DIR,
    DATA_CACHE,
    PREFLIGHT,
)


def micro_rows(per_process: int, max_rows: int) -> int:
    """The largest divisor of `per_process` that is at most `max_rows` (at least 1).

    >>> micro_rows(16, 5), micro_rows(16, 100), micro_rows(7, 3)
    (4, 16, 1)
    """
    return max(d for d in range(1, min(per_process, max(max_rows, 1)) + 1) if per_process % d == 0)


def dtypes(config: Any, device: str) -> tuple[str, str]:
    """(master dtype the weights are loaded in, compute dtype) as names; "auto" compute is bfloat16
    on a GPU and float32 on a CPU, as in the rpt backend (bf16 then runs as accelerate's mixed
    precision over the float32 weights).

    >>> from rpttrain.config import TrainConfig
    >>> dtypes(TrainConfig("t", "o"), "cpu"), dtypes(TrainConfig("t", "o"), "cuda")
    (('float32', 'float32'), ('float32', 'bfloat16'))
    """
    compute = config.compute_dtype
    if compute == "auto":
        compute = "bfloat16" if device.startswith("cuda") else "float32"
    return config.master_dtype, compute


def grpo_args(config: Any, world_size: int = 1, device: str = "cpu") -> dict:
    """GRPOConfig keyword arguments for a TrainConfig (the module docstring's table).

    >>> from rpttrain.config import TrainConfig
    >>> a = grpo_args(TrainConfig("t", "o", batch_size=4, group_size=4, max_new_tokens=1, max_prompt_tokens=63,
    ...                           micro_batch_tokens=256), world_size=2)
    >>> a["per_device_train_batch_size"], a["steps_per_generation"], a["gradient_accumulation_steps"], a["loss_type"]
    (4, 2, 2, 'dapo')
    """
    c = config
    completions = c.batch_size * c.group_size
    if completions % world_size:
        raise BackendOptionError(
            f"batch_size x group_size = {completions} completions per step must split evenly over {world_size} processes"
        )
    per_process = completions // world_size
    rows = micro_rows(per_process, c.micro_batch_tokens // (c.max_prompt_tokens + c.max_new_tokens))
    accumulation = per_process // rows
    _, compute = dtypes(c, device)
    return dict(
        max_steps=c.steps,
        per_device_train_batch_size=rows,
        gradient_accumulation_steps=accumulation,
        steps_per_generation=accumulation,
        num_iterations=1,
        num_generations=c.group_size,
        temperature=c.temperature,
        top_p=c.top_p,
        top_k=0,
        max_completion_length=c.max_new_tokens,
        beta=c.kl_coef,
        epsilon=c.clip_eps,
        epsilon_high=c.clip_eps if c.clip_eps_high is None else c.clip_eps_high,
        scale_rewards=c.scale_rewards,
        loss_type=LOSS_TYPES[c.loss_agg],
        learning_rate=c.lr,
        adam_beta1=c.adam_beta1,
        adam_beta2=c.adam_beta2,
        weight_decay=c.weight_decay,
        max_grad_norm=c.grad_clip,
        warmup_steps=c.warmup_steps,
        lr_scheduler_type="constant_with_warmup",
        bf16=compute == "bfloat16",
        fp16=compute == "float16",
        gradient_checkpointing=c.gradient_checkpointing,
        seed=c.seed,
        data_seed=c.seed,
        save_strategy="steps",
        save_steps=c.save_every,
        save_total_limit=c.keep_checkpoints,
        logging_steps=1,
        report_to=trl_report_to(c.report_to),
        disable_tqdm=not c.progress,
        use_cpu=device == "cpu",
        use_vllm=c.engine == "vllm",
        vllm_mode="colocate",
        vllm_gpu_memory_utilization=c.vllm_gpu_memory_utilization,
        remove_unused_columns=False,
        log_completions=False,
        trust_remote_code=c.trust_remote_code,
        model_init_kwargs={"dtype": dtypes(c, device)[0]},
    )


# ---------------------------------------------------------------------------------------------
# the run directory


def _identity(config: Any) -> str:
    ident = config.identity() if hasattr(config, "identity") else asdict(config)
    return fingerprint({"backend": "trl", "train": ident})


def prepare_run(config: Any, resume: bool, overwrite: bool) -> Path:
    """Create or reopen RUN by the rule every stage shares (`rptdata.stage.claim_run_dir`): another
    run's directory is refused, kept checkpoints need --resume, --overwrite clears our files."""
    import trl
    import yaml

    run = Path(config.out)
    claim_run_dir(
        run,
        STAGE_TRAIN,
        {"backend": "trl", "train": _identity(config)},
        OWN_FILES,
        overwrite=overwrite,
        resume=resume,
        progress=(f"{TRL_DIR}/checkpoint-*", "checkpoints/step-*"),
    )
    write_json_atomic(
        run / "backend.json", {"backend": "trl", "trl": trl.__version__, "fingerprint": _identity(config)}
    )
    write_text_atomic(run / "config.yaml", yaml.safe_dump(asdict(config), sort_keys=False))
    return run


def _last_trl_checkpoint(run: Path) -> Path | None:
    """The newest complete checkpoint-N: one holding the state.json that `link_checkpoint` writes
    after TRL has saved everything else. A later folder that a killed run left half-written is
    removed, so the resumed run writes it afresh."""
    import shutil

    from rpttrain.checkpoint import STATE_FILE

    folder = run / TRL_DIR
    found = sorted(
        (p for p in folder.glob("checkpoint-*") if p.is_dir() and p.name.removeprefix("checkpoint-").isdigit()),
        key=lambda p: int(p.name.removeprefix("checkpoint-")),
    )
    complete = [i for i, p in enumerate(found) if (p / STATE_FILE).exists() and (p / "trainer_state.json").exists()]
    last = complete[-1] if complete else -1
    for partial in found[last + 1 :]:  # sorted by step: every folder after the last complete one is partial
        log.warning("removing %s: a checkpoint a stopped run left half-written", partial)
        shutil.rmtree(partial, ignore_errors=True)
    return found[last] if complete else None


def train_dataset(tasks_dir: str, cache: Path):
    """The training tasks as a datasets.Dataset: prompt (the raw context), continuation,
    boundaries, task_id, and band when the tasks have it (for samples.jsonl); memory-mapped from
    the task shards."""
    import datasets

    files = [str(p) for p in list_shards(Path(tasks_dir) / "train")]
    ds = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=str(cache))
    columns = ["context", "continuation", "boundaries", "task_id"] + (["band"] if "band" in ds.column_names else [])
    return ds.select_columns(columns).rename_column("context", "prompt")


# ---------------------------------------------------------------------------------------------
# training


def train_trl(config: Any, resume: bool = False, tasks_manifest: dict | None = None) -> dict:
    """Train in this process (or in each process accelerate started); returns the summary.
    `tasks_manifest`: the tasks' manifest as `run_trl` read it (read here when not given)."""
    from trl import GRPOConfig

    from rptdata.models import local_model_dir, resolve_device
    from rpttrain.backends.trl_grpo import RptGRPOTrainer, RptReward, RunLog
    from rpttrain.data import policy_tokenizer
    from rpttrain.precision import resolve_precision
    from rpttrain.prompts import load_prompt_format

    c = config
    run = Path(c.out)
    device = "cpu" if c.device == "cpu" else resolve_device(c.device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    fmt = load_prompt_format(c.prompt_template)
    if tasks_manifest is None:  # a process accelerate started: run_trl checked the tasks before launching
        tasks_manifest = read_manifest(Path(c.tasks_dir), TASK_STAGES)
    tokenizer = policy_tokenizer(c, tasks_manifest)
    if 0 <= c.dynamic_sampling_from:
        log.info(
            "dynamic sampling from step %d: all-equal groups are dropped, the batch is not refilled",
            c.dynamic_sampling_from,
        )
    main_process = int(os.environ.get("RANK", "0")) == 0
    if main_process:  # rpt's estimate, as a warning only (`rpttrain.preflight`)
        precision = resolve_precision(c.compute_dtype, c.master_dtype, device)
        memory = RunPreflight.plan(c, device, precision, tasks_manifest, tokenizer, backend="trl")
        memory.start(run)
    args = GRPOConfig(output_dir=str(run / TRL_DIR), **grpo_args(c, world, device))
    reward = RptReward(fmt, c.reward, run / "samples.jsonl", c.sample_every)
    trainer = RptGRPOTrainer(
        model=local_model_dir(c.model),
        reward_funcs=reward,
        args=args,
        processing_class=tokenizer,
        train_dataset=train_dataset(c.tasks_dir, run / DATA_CACHE),
        rpt_format=fmt,
        max_prompt_tokens=c.max_prompt_tokens,
        dynamic_sampling_from=c.dynamic_sampling_from,
    )
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in trainer.model.parameters())
    runlog = RunLog(run, n_params, c.compute_budget)
    trainer.add_callback(runlog)
    last = _last_trl_checkpoint(run) if resume else None
    if last is not None:
        step = json.loads((last / "trainer_state.json").read_text())["global_step"]
        if trainer.accelerator.is_main_process:
            truncate_jsonl(run / "metrics.jsonl", step)
            truncate_jsonl(run / "samples.jsonl", step)
        log.info("resuming from %s", last)
    trainer.train(resume_from_checkpoint=str(last) if last else None)
    state = trainer.state
    stopped_by = "compute_budget" if state.global_step < c.steps else None
    summary = {
        "backend": "trl",
        "processes": trainer.accelerator.num_processes,
        "steps": state.global_step,
        "stopped_by": stopped_by,
        "run_dir": str(run),
        "totals": {
            "flops": runlog.flops(state),
            "update_tokens": int(state.num_input_tokens_seen),
            "samples": state.global_step * c.batch_size * c.group_size,
        },
    }
    if trainer.accelerator.is_main_process:
        write_json_atomic(run / "summary.json", summary)
    if main_process:
        memory.finish()
    return summary


def run_trl(
    config: Any,
    *,
    launch: bool = False,
    gpus_per_node: int = 1,
    nodes: int = 1,
    sharding: str = "ddp",
    resume: bool = False,
    overwrite: bool = False,
) -> dict:
    """`rpt train --backend trl`: in-process for one process, else through accelerate."""
    from rpttrain.data import open_tasks, task_unit

    tasks_manifest = open_tasks(config)
    if task_unit(tasks_manifest) in ("masked-sentence", "span"):
        raise BackendOptionError(
            f"--backend trl feeds TRL each task's context alone, and {task_unit(tasks_manifest)} tasks need the text "
            "after the mask too (context_after): train them with the in-house trainer or --backend verl"
        )
    run = prepare_run(config, resume, overwrite)
    world = gpus_per_node * nodes
    if world == 1:
        if sharding != "ddp":
            raise BackendOptionError("--sharding fsdp/zero3 needs more than one process (--gpus-per-node)")
        return train_trl(config, resume=resume, tasks_manifest=tasks_manifest)
    grpo_args(config, world)  # refuse a batch that does not split over the processes before launching
    cpu = config.device == "cpu"
    _, compute = dtypes(config, "cpu" if cpu else "cuda")
    mixed = {"bfloat16": "bf16", "float16": "fp16"}.get(compute, "no")
    command = launch_command(run, sharding, gpus_per_node, nodes, mixed, cpu, resume)
    summary = {"backend": "trl", "run_dir": str(run), "command": " ".join(shlex.quote(x) for x in command)}
    if not launch:
        return summary
    subprocess.run(command, check=True)
    return {**json.loads((run / "summary.json").read_text()), **summary}


def main(argv: list[str] | None = None) -> None:
    """`python -m rpttrain.backends.trl RUN [--resume]`: train RUN/config.yaml in this process."""
    import yaml

    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-"):
        raise SystemExit("usage: python -m rpttrain.backends.trl RUN_DIR [--resume]")
    run = Path(argv[0])
    from rpttrain.config import config_from_dict

    config = config_from_dict(yaml.safe_load((run / "config.yaml").read_text()))
    logging.basicConfig(level=logging.INFO)
    train_trl(config, resume="--resume" in argv[1:])


if __name__ == "__main__":
    main()
