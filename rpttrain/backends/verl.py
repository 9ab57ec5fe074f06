"""`rpt train --backend verl`: the tasks, the rpt reward and one TrainConfig as a verl 0.9.1 launch.

    run_verl(config, gpus_per_node=8, nodes=4)       # writes RUN/verl/, returns the command
    run_verl(config, gpus_per_node=8, launch=True)   # ... and runs it (verl, vllm and Ray installed)

Writes, under RUN/verl/:
    data/{train,eval}.parquet, data/manifest.json   `rpt export-tasks --format verl` of the tasks
    agent_loop.yaml        for the `continuation` format: rpttrain/backends/verl_agent_loop.py, so
                           the rollout sees the raw context tokenized as `rpt train` does
    launch.sh              `python -m verl.trainer.main_ppo` with every override below, quoted;
                           PYTHON (default python3) picks verl's environment
    checkpoints/           trainer.default_local_dir (verl's global_step_N folders)
and RUN/config.yaml (the TrainConfig) and RUN/backend.json.

How each TrainConfig option maps (`verl_overrides`); anything else is refused when set:
    batch_size B -> data.train_batch_size and actor.ppo_mini_batch_size (one update per batch, ppo_epochs 1)
    group_size G -> rollout.n; temperature, top_p -> rollout.*; max_prompt_tokens, max_new_tokens ->
    data.max_prompt_length, data.max_response_length
    reward, prompt_template  -> the exported rows; reward.custom_reward_function.path/name ->
                                rpttrain/integrations/verl.py:compute_score (verl 0.9.1 reads the
                                key under `reward.`; a top-level custom_reward_function is ignored)
    scale_rewards group|none -> algorithm.norm_adv_by_std_in_grpo; loss_agg -> actor.loss_agg_mode
    clip_eps, clip_eps_high  -> actor.clip_ratio_low, clip_ratio_high
    kl_coef   -> actor.use_kl_loss, kl_loss_coef, kl_loss_type=low_var_kl (k3); 0 loads no reference
    lr, adam_beta1/2, weight_decay, warmup_steps -> actor.optim.*; grad_clip -> actor.optim.clip_grad
              (what verl 0.9.1's FSDP engine applies) and actor.grad_clip (the documented key)
    micro_batch_tokens -> actor.use_dynamic_bsz with ppo_max_token_len_per_gpu (micro-batches by
              tokens, as rpt); the per-GPU micro-batch sizes validate_config demands follow from it
    dynamic_sampling_from N -> algorithm.filter_groups.enable/metric=reward (DAPO: all-equal groups
              dropped and the batch refilled). verl has no "from step N": with 0 < N < steps the
              script runs two phases, steps 1..N without and N+1..steps with filtering, the second
              resuming from the first's step-N checkpoint (trainer.resume_mode=auto)
    gradient_checkpointing, trust_remote_code -> actor_rollout_ref.model.*; seed -> data.seed,
              rollout.seed, actor.data_loader_seed; vllm_gpu_memory_utilization -> rollout
    save_every, keep_checkpoints -> trainer.save_freq, trainer.max_actor_ckpt_to_keep
    report_to -> trainer.logger: console and file always, plus tensorboard (TENSORBOARD_DIR=RUN/verl/tb)
              / wandb
    dtype (compute) -> actor fsdp_config.dtype and rollout.dtype; master_dtype -> fsdp_config.model_dtype
    engine must be auto or vllm, device auto or cuda (verl trains on GPUs with vLLM/SGLang rollouts)

Left out on purpose: refilling rounds (verl refills until the batch is full; dynamic_sampling_rounds
other than the default is refused), compute budgets, samples.jsonl and the non-finite-update guard.
verl's own logs go to RUN/verl/metrics-phase*.jsonl (trainer.logger=[console,file], plus --report-to's
tensorboard / wandb).
"""

from __future__ import annotations

import logging
import shlex
import subprocess
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rptdata.io import STAGE_TRAIN, write_json_atomic, write_text_atomic
from rptdata.stage import claim_run_dir
from rpttrain.backends import HONOURED_BY_BOTH, IRRELEVANT_TO_RPT, BackendOptionError
from rpttrain.report_to import verl_loggers

log = logging.getLogger(__name__)

__all__ = ["HONOURED", "VERL_VERSION", "launch_script", "phases", "run_verl", "verl_overrides"]

VERL_VERSION = "0.9.1"  # the release these overrides are tested against (make test-verl)
HONOURED = HONOURED_BY_BOTH | IRRELEVANT_TO_RPT

LOSS_AGG_MODES = {"token-mean": "token-mean", "seq-mean": "seq-mean-token-mean", "dr-grpo": "seq-mean-token-sum-norm"}
DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
VERL_DIR = "verl"


def phases(config: Any) -> list[tuple[int, bool]]:
    """(last step, dynamic sampling on) for each verl run the paper's schedule needs.

    >>> from rpttrain.config import TrainConfig
    >>> phases(TrainConfig("t", "o", steps=1000, dynamic_sampling_from=500))
    [(500, False), (1000, True)]
    >>> phases(TrainConfig("t", "o", steps=10, dynamic_sampling_from=0)), phases(TrainConfig("t", "o", steps=10, dynamic_sampling_from=-1))
    ([(10, True)], [(10, False)])
    """
    start = config.dynamic_sampling_from
    if start < 0 or start >= config.steps:
        return [(config.steps, False)]
    if start == 0:
        return [(config.steps, True)]
    return [(start, False), (config.steps, True)]


def _value(v: Any) -> str:
    """A value as Hydra's override grammar reads it."""
    if isinstance(v, bool):
        return "True" if v else "False"
    if v is None:
        return "null"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_value(x) for x in v) + "]"
    return str(v)


def verl_overrides(
    config: Any,
    *,
    data_dir: Path,
    run_dir: Path,
    model_path: str,
    reward_path: str,
    gpus_per_node: int = 1,
    nodes: int = 1,
    last_step: int | None = None,
    dynamic: bool = False,
    raw_prompt: bool = False,
) -> list[str]:
    """The `key=value` overrides of verl's ppo_trainer config for one phase of a TrainConfig.

    >>> from rpttrain.config import TrainConfig
    >>> o = verl_overrides(TrainConfig("t", "o", batch_size=4, group_size=2, max_new_tokens=1, max_prompt_tokens=63,
    ...                                micro_batch_tokens=256), data_dir=Path("d"), run_dir=Path("r"), model_path="m",
    ...                    reward_path="/x/verl.py")
    >>> for x in o:
    ...     if x.startswith(("reward.custom", "actor_rollout_ref.rollout.n=", "actor_rollout_ref.actor.ppo_micro")):
    ...         print(x)
    actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4
    actor_rollout_ref.rollout.n=2
    reward.custom_reward_function.path=/x/verl.py
    reward.custom_reward_function.name=compute_score
    """
    c = config
    seq = c.max_prompt_tokens + c.max_new_tokens
    token_budget = max(c.micro_batch_tokens, seq)  # verl needs a whole sequence to fit one micro-batch
    micro = max(1, token_budget // seq)
    tp = 2 if gpus_per_node % 2 == 0 else 1
    compute = getattr(c, "compute_dtype", None) or getattr(c, "dtype", "auto")
    master = getattr(c, "master_dtype", None) or ("auto" if compute == "auto" else compute)
    a, r, o = "actor_rollout_ref.actor", "actor_rollout_ref.rollout", "actor_rollout_ref.actor.optim"
    kv: list[tuple[str, Any]] = [
        ("algorithm.adv_estimator", "grpo"),
        ("algorithm.norm_adv_by_std_in_grpo", c.scale_rewards == "group"),
        ("algorithm.use_kl_in_reward", False),
        ("algorithm.filter_groups.enable", dynamic),
        ("algorithm.filter_groups.metric", "reward"),
        ("data.train_files", str(data_dir / "train.parquet")),
        ("data.val_files", str(data_dir / "eval.parquet")),
        ("data.prompt_key", "prompt"),
        ("data.train_batch_size", c.batch_size),
        ("data.max_prompt_length", c.max_prompt_tokens),
        ("data.max_response_length", c.max_new_tokens),
        # raw prompts are cut by the agent loop like rpt's; chat prompts longer than the limit are dropped
        ("data.filter_overlong_prompts", not raw_prompt),
        ("data.truncation", "left"),
        ("data.shuffle", True),
        ("data.seed", c.seed),
        ("actor_rollout_ref.model.path", model_path),
        ("actor_rollout_ref.model.trust_remote_code", c.trust_remote_code),
        ("actor_rollout_ref.model.enable_gradient_checkpointing", c.gradient_checkpointing),
        (f"{o}.lr", c.lr),
        (f"{o}.betas", [c.adam_beta1, c.adam_beta2]),
        (f"{o}.weight_decay", c.weight_decay),
        (f"{o}.lr_warmup_steps", c.warmup_steps if c.warmup_steps > 0 else -1),
        (f"{o}.lr_scheduler_type", "constant"),
        (f"{o}.clip_grad", c.grad_clip),
        (f"{a}.grad_clip", c.grad_clip),
        (f"{a}.ppo_mini_batch_size", c.batch_size),
        (f"{a}.ppo_epochs", 1),
        (f"{a}.use_dynamic_bsz", True),
        (f"{a}.ppo_max_token_len_per_gpu", token_budget),
        (f"{a}.ppo_micro_batch_size_per_gpu", micro),
        (f"{a}.clip_ratio_low", c.clip_eps),
        (f"{a}.clip_ratio_high", c.clip_eps if c.clip_eps_high is None else c.clip_eps_high),
        (f"{a}.loss_agg_mode", LOSS_AGG_MODES[c.loss_agg]),
        (f"{a}.use_kl_loss", c.kl_coef > 0),
        (f"{a}.kl_loss_coef", c.kl_coef),
        (f"{a}.kl_loss_type", "low_var_kl"),
        (f"{a}.entropy_coeff", 0),
        (f"{a}.data_loader_seed", c.seed),
        (f"{r}.name", "vllm"),
        (f"{r}.n", c.group_size),
        (f"{r}.temperature", c.temperature),
        (f"{r}.top_p", c.top_p),
        (f"{r}.seed", c.seed),
        (f"{r}.gpu_memory_utilization", c.vllm_gpu_memory_utilization),
        (f"{r}.tensor_model_parallel_size", tp),
        (f"{r}.log_prob_micro_batch_size_per_gpu", micro),
        ("reward.custom_reward_function.path", reward_path),
        ("reward.custom_reward_function.name", "compute_score"),
        ("trainer.total_training_steps", c.steps if last_step is None else last_step),
        ("trainer.nnodes", nodes),
        ("trainer.n_gpus_per_node", gpus_per_node),
        ("trainer.save_freq", c.save_every),
        ("trainer.max_actor_ckpt_to_keep", c.keep_checkpoints),
        ("trainer.default_local_dir", str(run_dir / VERL_DIR / "checkpoints")),
        ("trainer.resume_mode", "auto"),
        ("trainer.val_before_train", False),
        ("trainer.test_freq", -1),
        ("trainer.logger", verl_loggers(c.report_to)),
        ("trainer.project_name", "rpt"),
        ("trainer.experiment_name", run_dir.name),
    ]
    if c.loss_agg == "dr-grpo":
        kv.append((f"{a}.loss_scale_factor", c.max_new_tokens))
    if c.kl_coef > 0:
        kv.append(("actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu", micro))
    if compute != "auto":
        kv += [(f"{a}.fsdp_config.dtype", compute), (f"{r}.dtype", compute)]
    if master != "auto":
        kv.append((f"{a}.fsdp_config.model_dtype", DTYPES[master]))
    if raw_prompt:
        from rpttrain.backends.verl_agent_loop import AGENT_NAME

        kv += [
            (f"{r}.agent.agent_loop_config_path", str(run_dir / VERL_DIR / "agent_loop.yaml")),
            (f"{r}.agent.default_agent_loop", AGENT_NAME),
        ]
    return [f"{k}={_value(v)}" for k, v in kv]


def launch_script(phase_overrides: list[list[str]], metrics_files: list[Path]) -> str:
    """A bash script running verl's main_ppo once per phase, every override single-quoted."""
    lines = [
        "#!/usr/bin/env bash",
        "# written by `rpt train --backend verl`; PYTHON selects verl's environment (rpt installed in it)",
        "# several nodes: start a Ray cluster first (ray start --head / --address) and run this on the head node",
        "set -euo pipefail",
        'PYTHON="${PYTHON:-python3}"',
    ]
    if metrics_files:  # where verl's tensorboard logger (--report-to tensorboard) writes
        lines.append(f"export TENSORBOARD_DIR={shlex.quote(str(Path(metrics_files[0]).parent / 'tb'))}")
    for i, (overrides, metrics) in enumerate(zip(phase_overrides, metrics_files), 1):
        if len(phase_overrides) > 1:
            lines.append(
                f"# phase {i} of {len(phase_overrides)}"
                + (
                    ": dynamic sampling on, resuming from the previous phase's last checkpoint"
                    if i > 1
                    else ": up to the step dynamic sampling starts"
                )
            )
        lines.append(f'VERL_FILE_LOGGER_PATH={shlex.quote(str(metrics))} "$PYTHON" -m verl.trainer.main_ppo \\')
        lines += [f"    {shlex.quote(x)} \\" for x in overrides[:-1]] + [f"    {shlex.quote(overrides[-1])}"]
    return "\n".join(lines) + "\n"


def _model_path(spec: str) -> str:
    from rptdata.models import local_model_dir

    return local_model_dir(spec)


def run_verl(
    config: Any,
    *,
    launch: bool = False,
    gpus_per_node: int = 1,
    nodes: int = 1,
    resume: bool = False,
    overwrite: bool = False,
) -> dict:
    """Write RUN/verl/ (module docstring) and return {"command", "script", "phases", ...}; with
    `launch`, run the script here (verl's main_ppo needs GPUs, Ray and vLLM)."""
    import yaml

    import rpttrain.integrations.verl as reward_module
    from rpttrain.backends.verl_agent_loop import agent_loop_yaml
    from rpttrain.data import open_tasks, policy_tokenizer
    from rpttrain.export import ExportConfig, run_export_tasks
    from rpttrain.prompts import load_prompt_format

    c = config
    if c.engine not in ("auto", "vllm"):
        raise BackendOptionError(f"--backend verl rolls out with vLLM; --engine {c.engine} cannot be honoured")
    if c.device not in ("auto", "cuda"):
        raise BackendOptionError(f"--backend verl trains on GPUs; --device {c.device} cannot be honoured")
    run = Path(c.out).resolve()
    vdir = run / VERL_DIR
    # the rule every stage shares (`rptdata.stage.claim_run_dir`); kept checkpoints need --resume
    claim_run_dir(
        run,
        STAGE_TRAIN,
        {"backend": "verl", "config": asdict(c)},
        ("config.yaml", "backend.json", VERL_DIR),
        overwrite=overwrite,
        resume=resume,
        progress=(f"{VERL_DIR}/checkpoints", "checkpoints/step-*", "trl/checkpoint-*"),
    )
    fmt = load_prompt_format(c.prompt_template)
    tasks_manifest = open_tasks(c)
    policy_tokenizer(c, tasks_manifest)
    vdir.mkdir(parents=True, exist_ok=True)
    data = vdir / "data"
    export = run_export_tasks(
        ExportConfig(
            c.tasks_dir,
            str(data),
            "verl",
            prompt_template=c.prompt_template,
            reward=c.reward,
            overwrite=True,
            progress=c.progress,
        )
    )
    raw = not fmt.uses_chat
    if raw:
        write_text_atomic(vdir / "agent_loop.yaml", agent_loop_yaml())
    reward_path = str(Path(reward_module.__file__).resolve())
    plan = phases(c)
    overrides = [
        verl_overrides(
            c,
            data_dir=data,
            run_dir=run,
            model_path=_model_path(c.model),
            reward_path=reward_path,
            gpus_per_node=gpus_per_node,
            nodes=nodes,
            last_step=last,
            dynamic=dyn,
            raw_prompt=raw,
        )
        for last, dyn in plan
    ]
    metrics = [vdir / f"metrics-phase{i}.jsonl" for i in range(1, len(plan) + 1)]
    script = vdir / "launch.sh"
    write_text_atomic(script, launch_script(overrides, metrics))
    script.chmod(0o755)
    write_text_atomic(run / "config.yaml", yaml.safe_dump(asdict(c), sort_keys=False))
    write_json_atomic(run / "backend.json", {"backend": "verl", "verl": VERL_VERSION, "config": asdict(c)})
    summary = {
        "backend": "verl",
        "run_dir": str(run),
        "script": str(script),
        "command": f"bash {shlex.quote(str(script))}",
        "phases": plan,
        "rows": export["rows"],
        "overrides": overrides,
    }
    if launch:
        subprocess.run(["bash", str(script)], check=True)
    return summary
