from __future__ import annotations

import click

from cli.common import library_errors, model_help, model_runtime_options, trust_remote_code_option
from rpttrain.reward import REWARD_NAMES


@click.command()
@click.argument("tasks_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--model", default="smollm2-135m", show_default=True, help=model_help("Policy to probe"))
@click.option(
    "--prompt-template",
    "templates",
    multiple=True,
    help="Formats to compare (repeat): v0 v2 v6 continuation FILE, or for make-tasks --unit tasks sentence, "
    "masked-sentence, masked-span. Default: v0 v2 v6 continuation.",
)
@click.option("--samples", default=8, show_default=True, help="Samples per task (G); Pass@G is reported.")
@click.option("--tasks", "n_tasks", default=16, show_default=True, help="Tasks to probe (the first N of the split).")
@click.option(
    "--split", default="train", show_default=True, type=click.Choice(["train", "eval"]), help="Which split's tasks."
)
@click.option("--temperature", default=0.8, show_default=True, help="Sampling temperature (paper: 0.8).")
@click.option("--max-new-tokens", default=256, show_default=True, help="Completion budget of the reasoning formats.")
@click.option(
    "--continuation-new-tokens",
    default=1,
    show_default=True,
    help="Tokens sampled in the continuation format (the prediction).",
)
@click.option(
    "--max-prompt-tokens", default=1024, show_default=True, help="Longest prompt; contexts lose their start beyond it."
)
@click.option(
    "--reward",
    default="prefix",
    show_default=True,
    type=click.Choice(REWARD_NAMES),
    help="Reward rule (dense ones: App. A, P(y[0] | x<t) from --model; judge: --judge MODEL decides).",
)
@click.option(
    "--judge",
    default=None,
    help="The judge model of --reward judge (sentence and span tasks): it decides whether each prediction is a "
    "semantic prefix of the target; verdicts cached as rpt train's (rpttrain/judge.py).",
)
@click.option(
    "--judge-max-new-tokens", default=64, show_default=True, help="Tokens the judge may write before its verdict."
)
@click.option(
    "--judge-cache",
    default=None,
    type=click.Path(dir_okay=False),
    help="SQLite file of the judge's verdicts [default: $RPT_CACHE_DIR/judge/<judge>.sqlite].",
)
@model_runtime_options("Rollout engine: hf, vllm, or auto: vllm on CUDA when it is installed, else hf.")
@click.option("--seed", default=0, show_default=True, help="Sampling seed.")
@click.option(
    "--out",
    default=None,
    type=click.Path(dir_okay=False),
    help="Also write the rows (with example completions) as JSON.",
)
@trust_remote_code_option
@library_errors
def probe(
    tasks_dir,
    model,
    templates,
    samples,
    n_tasks,
    split,
    temperature,
    max_new_tokens,
    continuation_new_tokens,
    max_prompt_tokens,
    reward,
    judge,
    judge_max_new_tokens,
    judge_cache,
    engine,
    dtype,
    device,
    seed,
    out,
    trust_remote_code,
):
    """Measure, per prompt format, whether a model gets RPT reward signal (paper Table 8).

    Prints Random@1, Pass@G, the share of boxed answers, mean completion length and the share
    of groups whose rewards differ (the only groups GRPO learns from).

    \b
    Example:
      rpt probe out/tasks --model smollm2-135m --prompt-template v0 --prompt-template continuation --tasks 10
    """
    from rpttrain.probe import ProbeConfig, format_table, run_probe

    config = ProbeConfig(
        tasks_dir=tasks_dir,
        model=model,
        templates=tuple(templates) or ProbeConfig.templates,
        samples=samples,
        tasks=n_tasks,
        split=split,
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        continuation_new_tokens=continuation_new_tokens,
        max_prompt_tokens=max_prompt_tokens,
        reward=reward,
        judge=judge,
        judge_max_new_tokens=judge_max_new_tokens,
        judge_cache=judge_cache,
        engine=engine,
        dtype=dtype,
        device=device,
        seed=seed,
        out=out,
        trust_remote_code=trust_remote_code,
    )
    click.echo(format_table(run_probe(config)))
