"""`rpt train --backend rpt|verl|trl`: one TrainConfig, three trainers.

    run_backend(config, "trl")                                     # TRL's GRPOTrainer, in this process
    run_backend(config, "trl", gpus_per_node=8, launch=True)       # accelerate launch, DDP
    run_backend(config, "verl", gpus_per_node=8, nodes=4)          # writes RUN/verl/, returns the command
    run_backend(config, "verl", gpus_per_node=8, launch=True)      # ... and runs it

- `rpt` is the in-house trainer (`rpttrain.train.run_train`): one process, one device.
- `trl` (rpttrain/backends/trl.py): TRL's GRPOTrainer with rpt's prompts, reward and run layout
  (metrics.jsonl, checkpoints/step-N that `rpt plot` and `rpt eval --checkpoints` read); several
  GPUs through a generated accelerate config (DDP, FSDP or DeepSpeed ZeRO-3).
- `verl` (rpttrain/backends/verl.py): exports the tasks, writes a raw-prompt agent loop and a
  complete launch script for `verl.trainer.main_ppo`; verl runs it on a Ray cluster of GPUs.

Every TrainConfig option is either honoured by a backend (mapped onto the engine's own setting) or,
when set to anything but its default, refused by name: nothing is dropped silently.
`unsupported_options` says which; each backend module lists what it honours in `HONOURED` and
documents how.
"""

from __future__ import annotations

import logging
from dataclasses import MISSING, fields
from typing import Any

from rptdata.errors import BackendOptionError, BadOption  # BackendOptionError: re-exported here

log = logging.getLogger(__name__)

__all__ = ["BACKENDS", "BackendOptionError", "check_backend", "run_backend", "unsupported_options"]

BACKENDS = ("rpt", "verl", "trl")


# next-token-baseline knobs: an RPT run ignores them (TrainConfig.identity drops them), so may every backend
IRRELEVANT_TO_RPT = frozenset({"ntp_positions", "beta", "topk", "lambda_top", "lambda_tail"})
# the options both the TRL and the verl backend honour (each module says how); each adds its own
HONOURED_BY_BOTH = frozenset(
    {
        "tasks_dir",
        "out",
        "model",
        "steps",
        "batch_size",
        "group_size",
        "temperature",
        "top_p",
        "max_new_tokens",
        "max_prompt_tokens",
        "prompt_template",
        "reward",
        "scale_rewards",
        "loss_agg",
        "clip_eps",
        "clip_eps_high",
        "kl_coef",
        "lr",
        "adam_beta1",
        "adam_beta2",
        "weight_decay",
        "grad_clip",
        "warmup_steps",
        "dynamic_sampling_from",
        "micro_batch_tokens",
        "engine",
        "compute_dtype",
        "master_dtype",
        "device",
        "gradient_checkpointing",
        "seed",
        "save_every",
        "keep_checkpoints",
        "allow_tokenizer_mismatch",
        "trust_remote_code",
        "vllm_gpu_memory_utilization",
        "progress",
        "report_to",
    }
)


def _honoured(backend: str) -> frozenset[str]:
    if backend == "verl":
        from rpttrain.backends.verl import HONOURED
    elif backend == "trl":
        from rpttrain.backends.trl import HONOURED
    else:
        raise BadOption(f"unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    return HONOURED


def unsupported_options(config: Any, backend: str) -> list[str]:
    """TrainConfig fields set away from their default that `backend` cannot honour.

    >>> from rpttrain.config import TrainConfig
    >>> unsupported_options(TrainConfig("t", "o", max_bad_steps=2, objective="ntp"), "verl")
    ['objective', 'max_bad_steps']
    >>> unsupported_options(TrainConfig("t", "o"), "rpt")
    []
    """
    from rpttrain.config import RMT_OFF

    if backend == "rpt":
        return []
    honoured = _honoured(backend)
    out = []
    for f in fields(config):
        if f.name in honoured:
            continue
        if f.name in RMT_OFF:  # RMT's options: None in the field, resolved by the objective
            default = RMT_OFF[f.name]
        elif f.default is not MISSING:
            default = f.default
        else:
            default = f.default_factory() if f.default_factory is not MISSING else MISSING
        if default is MISSING or getattr(config, f.name) != default:
            out.append(f.name)
    return out


def check_backend(config: Any, backend: str) -> None:
    """Raise BackendOptionError naming every option `backend` cannot honour."""
    from rpttrain.reward import DENSE_REWARDS

    if backend != "rpt" and getattr(config, "reward", None) in DENSE_REWARDS:
        raise BackendOptionError(
            f"--backend {backend} cannot honour --reward {config.reward}: it needs the policy's probability of the "
            f"prediction's first token, P(y[0] | x<t), which {backend}'s reward functions (text in, a number out) "
            "never see. Use --backend rpt, or --reward prefix|first-token."
        )
    if backend != "rpt" and getattr(config, "reward", None) == "judge":
        raise BackendOptionError(
            f"--backend {backend} cannot honour --reward judge (--judge {config.judge}): the judge is a second model "
            f"that the reward must run, batched through a rollout engine, with its FLOPs counted and its verdicts "
            f"cached; {backend}'s reward functions take text and return numbers, inside {backend}'s workers. Use "
            "--backend rpt, or --reward exact|exact-nocase."
        )
    if backend != "rpt" and getattr(config, "objective", "rpt") == "rlp":
        raise BackendOptionError(
            f"--backend {backend} cannot honour --objective rlp: its reward scores the next token after each "
            "thought with the policy and an EMA copy of it, which the EMA's state and its update after every "
            f"optimizer step would have to live inside {backend}'s trainer; {backend} ships no such objective. "
            "Use --backend rpt."
        )
    bad = unsupported_options(config, backend)
    if bad:
        names = ", ".join(f"{n} (--{n.replace('_', '-')}={getattr(config, n)!r})" for n in bad)
        raise BackendOptionError(
            f"--backend {backend} cannot honour: {names}. Leave them at their defaults, or use --backend rpt "
            f"(see rpttrain/backends/{backend}.py for what each option maps to)."
        )


def run_backend(
    config: Any,
    backend: str,
    *,
    launch: bool = False,
    gpus_per_node: int = 1,
    nodes: int = 1,
    sharding: str = "ddp",
    resume: bool = False,
    overwrite: bool = False,
) -> dict:
    """Train `config` with `backend`; returns a summary dict.

    `gpus_per_node`, `nodes`: the cluster (verl: trainer.n_gpus_per_node / trainer.nnodes; trl:
    accelerate's processes). `launch`: verl runs the written script, trl starts `accelerate launch`
    when more than one process is asked for (a single process always trains in-process).
    `sharding` (trl only): ddp | fsdp | zero3. The summary has `command` (the launch line) for
    verl and multi-process trl, and the rpt backend's keys (steps, totals, run_dir) for a run that
    trained here.
    """
    if backend not in BACKENDS:
        raise BackendOptionError(f"unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    if gpus_per_node < 1 or nodes < 1:
        raise BackendOptionError("--gpus-per-node and --nodes must be at least 1")
    if backend == "rpt":
        if (gpus_per_node, nodes, launch, sharding) != (1, 1, False, "ddp"):
            raise BackendOptionError(
                "--backend rpt trains in one process on one device; --gpus-per-node, --nodes, --launch and "
                "--sharding need --backend trl or verl"
            )
        from rpttrain.train import run_train

        return run_train(config, resume=resume, overwrite=overwrite)
    check_backend(config, backend)
    if backend == "verl":
        if sharding != "ddp":
            raise BackendOptionError("--sharding is for --backend trl; verl shards the actor with FSDP itself")
        from rpttrain.backends.verl import run_verl

        return run_verl(
            config, launch=launch, gpus_per_node=gpus_per_node, nodes=nodes, resume=resume, overwrite=overwrite
        )
    from rpttrain.backends.trl import run_trl

    return run_trl(
        config,
        launch=launch,
        gpus_per_node=gpus_per_node,
        nodes=nodes,
        sharding=sharding,
        resume=resume,
        overwrite=overwrite,
    )
