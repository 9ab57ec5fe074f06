from __future__ import annotations

from dataclasses import MISSING, fields

import click

from cli.common import library_errors

# help for every TrainConfig field; options are generated from the dataclass so that every one
# is settable both here and in --config YAML
HELP = {
    "model": "Policy: hub id, local folder, .gguf, or smollm2-135m.",
    "objective": "rpt: GRPO with the prefix reward | ntp: cross-entropy (continual next-token training) | shaped-ntp: the reward-shaped next-token loss (arXiv 2512.22955). Compare them at equal --compute-budget.",
    "steps": "Optimizer steps to run in total (a resumed run continues up to this).",
    "batch_size": "Contexts per step, B (paper: 256).",
    "group_size": "Rollouts per context, G (paper: 8).",
    "temperature": "Sampling temperature of rollouts; log-probs use the same (paper: 0.8).",
    "top_p": "Nucleus sampling of rollouts (1.0 = off).",
    "max_new_tokens": "Longest completion (paper: 8192; the continuation format needs 1-8).",
    "max_prompt_tokens": "Longest prompt; longer contexts lose their start (paper: 4096).",
    "prompt_template": "v0 | v2 | v6 (reasoning, boxed answer) | continuation (raw text, for base/small models) | FILE.",
    "reward": "prefix (paper Eq. 3) | first-token.",
    "scale_rewards": "group: (r-mean)/std per group (GRPO) | none: r-mean (Dr. GRPO).",
    "loss_agg": "token-mean | seq-mean | dr-grpo (sum / (sequences x max_new_tokens)).",
    "clip_eps": "PPO clip epsilon (low side; also the high side unless --clip-eps-high).",
    "clip_eps_high": "Upper clip epsilon (DAPO clip-higher); default = --clip-eps.",
    "kl_coef": "KL(pi||ref) coefficient, k3 estimator; 0 loads no reference model (paper: 0).",
    "lr": "AdamW learning rate (paper: 1e-6).",
    "adam_beta1": "AdamW beta1.",
    "adam_beta2": "AdamW beta2.",
    "weight_decay": "AdamW weight decay (paper: 0.01).",
    "grad_clip": "Gradient norm clip (paper's actor clip: 0.2).",
    "warmup_steps": "Linear learning-rate warm-up steps.",
    "dynamic_sampling_from": "Step from which zero-variance groups are dropped and refilled (DAPO; paper: 500; -1 = never).",
    "dynamic_sampling_rounds": "Most extra generation rounds per step to refill the batch.",
    "micro_batch_tokens": "Padded tokens per forward/backward micro-batch (bounds memory).",
    "engine": "Rollout engine: auto (vllm on CUDA when installed, else hf) | hf | vllm.",
    "compute_dtype": "What forward/backward and rollouts compute in: auto (bfloat16 on CUDA, float32 on CPU) | float32 | bfloat16. Checkpoints' HF folders are saved in it.",
    "master_dtype": "What the optimizer updates (parameters, gradients, AdamW state): float32 (default; with bfloat16 compute this is standard mixed precision, torch.autocast over float32 weights) | bfloat16 (pure bf16, only with --compute-dtype bfloat16: updates below half a bf16 step, e.g. lr 1e-6, are rounded away; a warning says so).",
    "device": "auto | cpu | cuda.",
    "gradient_checkpointing": "Trade compute for activation memory.",
    "seed": "Seed of data order, sampling and init (runs are reproducible on CPU).",
    "save_every": "Checkpoint every N steps (and at the end, on SIGINT/SIGTERM, at the budget).",
    "keep_checkpoints": "Keep only the newest N checkpoints.",
    "sample_every": "Write completions of two groups to samples.jsonl every N steps (0 = never).",
    "max_bad_steps": "Stop after this many consecutive non-finite updates (each is skipped).",
    "compute_budget": "Stop, with a checkpoint, once this many training FLOPs are spent (6·N per trained token, 2·N per token the rollout engine runs; docs/compare.md).",
    "allow_tokenizer_mismatch": "Train although the tasks were built with another tokenizer.",
    "trust_remote_code": "Allow the model repository's custom code.",
    "vllm_gpu_memory_utilization": "GPU memory share for the colocated vLLM engine.",
    "memory_check": "Before loading weights, estimate the run's peak memory (weights, gradients, master copy, AdamW, activations, vLLM's share) and stop with the numbers and the ways out when it exceeds the device's free memory.",
    "memory_budget_gib": "Plan for this much memory (GiB) instead of the device's free memory (e.g. on a shared GPU).",
    "ntp_positions": "Baselines: train on every token of the training documents (all) or only on the task positions (tasks).",
    "beta": "shaped-ntp: weight w = stop_grad((1 - p_x) ** beta) on -log p_x; < 0 sharpens, > 0 flattens (paper's best: -0.25).",
    "topk": "shaped-ntp: K, the top tokens (chosen without gradient) that lambda_top applies to.",
    "lambda_top": "shaped-ntp: loss -= lambda_top * (probability of the top-K tokens other than the target).",
    "lambda_tail": "shaped-ntp: loss -= lambda_tail * (probability outside top-K, target excluded); -0.1 penalizes the tail.",
    "progress": "Show a progress bar.",
}


def _options(fn):
    from rpttrain.train import TrainConfig

    for f in reversed([f for f in fields(TrainConfig) if f.name not in ("tasks_dir", "out")]):
        name = "--" + f.name.replace("_", "-")
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "str")
        default = None if f.default is MISSING else f.default
        show = f" [default: {default}]"
        if "bool" in kind:
            fn = click.option(f"{name}/--no-{f.name.replace('_', '-')}", default=None, help=HELP[f.name] + show)(fn)
        else:
            typ = float if "float" in kind else int if "int" in kind else str
            fn = click.option(name, type=typ, default=None, help=HELP[f.name] + show)(fn)
    return fn


@click.command()
@click.argument("tasks_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="Run directory.")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False), help="YAML file of options (command-line options win).")
@click.option("--resume", is_flag=True, help="Continue from the newest complete checkpoint in --out, exactly.")
@click.option("--overwrite", is_flag=True, help="Delete an existing run in --out and start over.")
@_options
@library_errors
def train(tasks_dir, out, config_file, resume, overwrite, **options):
    """Train a policy with GRPO on RPT tasks (the prefix-matching reward).

    Defaults are the paper's recipe (Table 5). On a CPU, use a small batch, the continuation
    format and a few new tokens.

    \b
    Example (CPU, embedded model):
      rpt train out/tasks --out out/run --prompt-template continuation --max-new-tokens 1 \\
          --batch-size 16 --group-size 8 --lr 1e-5 --steps 20 --max-prompt-tokens 256
    Example (paper recipe):
      rpt train out/tasks --out out/run --config configs/paper.yaml
    """
    import yaml

    from rpttrain.train import config_from_dict, run_train

    data = {}
    if config_file:
        with open(config_file) as f:
            try:
                data = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise click.BadParameter(f"{config_file}: not valid YAML ({e})", param_hint="--config") from None
        if not isinstance(data, dict):
            raise click.UsageError(f"{config_file}: expected a mapping of option: value")
        data = {k.replace("-", "_"): v for k, v in data.items()}
    data.update({k: v for k, v in options.items() if v is not None})
    data.update(tasks_dir=tasks_dir, out=out)
    summary = run_train(config_from_dict(data), resume=resume, overwrite=overwrite)
    t = summary["totals"]
    why = {"signal": " (stopped by a signal; continue with --resume)", "compute_budget": " (compute budget reached)"}.get(summary["stopped_by"] or "", "")
    click.echo(f"train: {summary['steps']} steps{why}, {t['samples']:,} samples, {t['flops']:.3g} FLOPs -> {out}")
