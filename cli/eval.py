from __future__ import annotations

import click

from cli.common import (
    library_errors,
    model_help,
    model_runtime_options,
    no_progress_option,
    overwrite_option,
    trust_remote_code_option,
)
from rpttrain.reward import REWARD_NAMES


@click.command("eval")
@click.argument("tasks_dir", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--model",
    "models",
    multiple=True,
    help=model_help("Model to evaluate (repeat for several)")
    + " Default: smollm2-135m when no --checkpoints are given.",
)
@click.option(
    "--checkpoints",
    "runs",
    multiple=True,
    type=click.Path(exists=True, file_okay=False),
    help="An `rpt train` run directory (repeat): its base model (step 0) and every saved checkpoint, with training compute, and a scaling-law fit.",
)
@click.option(
    "--max-compute",
    default=None,
    type=float,
    help="Leave out checkpoints that spent more training FLOPs than this (e.g. 7.5e13): compares runs of different objectives at equal compute.",
)
@click.option(
    "--mode",
    default="ntp",
    show_default=True,
    type=click.Choice(["ntp", "reasoning", "both", "answer"]),
    help="ntp: greedy next token of the raw context; reasoning: the training prompt, generation, extraction; "
    "answer: answer tasks (rpt answer-tasks), the final answer checked with math-verify (pass@1, pass@K, maj@K).",
)
@click.option(
    "--samples",
    default=1,
    show_default=True,
    help="Reasoning samples per task (K); the score is their mean, and Pass@K is reported.",
)
@click.option(
    "--temperature",
    default=None,
    type=float,
    help="Reasoning sampling temperature. Default: greedy for --samples 1, else the run's (checkpoints) or 0.8.",
)
@click.option(
    "--max-new-tokens",
    default=None,
    type=int,
    help="Reasoning completion budget. Default: a run's own; else 256 for chat formats, 1 for continuation.",
)
@click.option(
    "--max-prompt-tokens", default=4096, show_default=True, help="Longest prompt; contexts lose their start beyond it."
)
@click.option(
    "--prompt-template",
    default=None,
    help="Reasoning format: v0 v2 v6 continuation or FILE. Default: v0, or each run's own template.",
)
@click.option(
    "--bands",
    default="0.5,1.0,1.5",
    show_default=True,
    help="Entropy thresholds of the nested bands (easy/medium/hard), or name=value pairs.",
)
@click.option(
    "--band-model",
    default=None,
    help=model_help("Recompute the band entropy (top-16) with this model instead of the tasks' column"),
)
@click.option(
    "--out",
    "-o",
    default=None,
    type=click.Path(file_okay=False),
    help="REPORT_DIR: report.md, report.json, predictions.parquet, scaling.png. Default: print only.",
)
@click.option("--limit", default=None, type=int, help="Evaluate the first N tasks of the split.")
@click.option(
    "--split",
    default="eval",
    show_default=True,
    type=click.Choice(["eval", "train"]),
    help="Which split's tasks (eval: held out).",
)
@click.option(
    "--allow-overlap",
    is_flag=True,
    help="Evaluate even when a run trained on evaluated documents (warns loudly; not held-out accuracy).",
)
@click.option(
    "--resume", is_flag=True, help="Continue an evaluation in --out, skipping (task, model, mode) rows already written."
)
@overwrite_option
@click.option(
    "--batch-size",
    default=16,
    show_default=True,
    help="Sequences per forward pass (ntp) or per generate call (reasoning).",
)
@click.option(
    "--flush-every", default=128, show_default=True, help="Tasks per predictions part file (the most a crash can lose)."
)
@click.option(
    "--reward",
    default="prefix",
    show_default=True,
    type=click.Choice(REWARD_NAMES),
    help="Reward rule (prefix: the paper's Eq. 3; dense ones: App. A, P(y[0] | x<t) from the model under test, and the cells are mean reward).",
)
@click.option("--seed", default=0, show_default=True, help="Sampling seed.")
@click.option(
    "--lm-eval-tasks",
    default=None,
    help="lm-evaluation-harness tasks (T1,T2) run on every evaluated model and checkpoint; rpt_heldout_bpb: "
    "bits per byte of the tasks' held-out documents (no download). Needs pip install 'rpt[lm-eval]'.",
)
@click.option(
    "--lm-eval-include",
    default=None,
    type=click.Path(exists=True, file_okay=False),
    help="Folder of local lm-eval task YAMLs (offline).",
)
@click.option("--lm-eval-limit", default=None, type=int, help="lm-eval: the first N documents of each task.")
@click.option(
    "--lm-eval-fewshot", default=None, type=int, help="lm-eval: few-shot examples (default: each task's own)."
)
@click.option("--lm-eval-batch-size", default=16, show_default=True, help="lm-eval: batch size.")
@model_runtime_options(
    "Rollout engine of the reasoning mode: hf, vllm, or auto: vllm on CUDA when it is installed, else hf."
)
@trust_remote_code_option
@no_progress_option
@library_errors
def eval_cmd(
    tasks_dir,
    models,
    runs,
    max_compute,
    mode,
    samples,
    temperature,
    max_new_tokens,
    max_prompt_tokens,
    prompt_template,
    bands,
    band_model,
    out,
    engine,
    limit,
    split,
    allow_overlap,
    resume,
    overwrite,
    batch_size,
    flush_every,
    reward,
    seed,
    lm_eval_tasks,
    lm_eval_include,
    lm_eval_limit,
    lm_eval_fewshot,
    lm_eval_batch_size,
    dtype,
    device,
    trust_remote_code,
    no_progress,
):
    """Next-token accuracy per entropy band (the paper's Table 1), with scaling fits over checkpoints.

    Prints a Markdown table (rows: model x mode, or run x checkpoint x mode; columns: the nested
    easy / medium / hard bands) with counts and 95% Wilson intervals, and writes REPORT_DIR.

    \b
    Example:
      rpt eval out/tasks --model smollm2-135m --out out/eval
      rpt eval out/tasks --checkpoints out/run --mode both --samples 8 --temperature 0.8 --out out/eval-run
      rpt eval out/tasks --checkpoints out/run --lm-eval-tasks rpt_heldout_bpb --lm-eval-limit 20 --out out/eval-bpb
      rpt eval out/gsm8k --checkpoints out/rlvr --mode answer --samples 4 --out out/eval-answers
      duckdb -c "SELECT mode, avg(reward) FROM 'out/eval/predictions.parquet' GROUP BY mode"
    """
    from rpttrain.eval import (
        PAIRED_LEGEND,
        EvalConfig,
        format_answer_table,
        format_band_counts,
        format_paired,
        format_scaling,
        format_table,
        format_table2,
        run_eval,
    )
    from rpttrain.eval.harness_report import format_harness

    if not models and not runs:
        models = ("smollm2-135m",)
    config = EvalConfig(
        tasks_dir=tasks_dir,
        models=tuple(models),
        checkpoints=tuple(runs),
        max_compute=max_compute,
        mode=mode,
        samples=samples,
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        max_prompt_tokens=max_prompt_tokens,
        prompt_template=prompt_template,
        bands=bands,
        band_model=band_model,
        out=out,
        engine=engine,
        limit=limit,
        split=split,
        allow_overlap=allow_overlap,
        resume=resume,
        overwrite=overwrite,
        batch_size=batch_size,
        flush_every=flush_every,
        reward=reward,
        seed=seed,
        dtype=dtype,
        device=device,
        trust_remote_code=trust_remote_code,
        progress=not no_progress,
        lm_eval_tasks=tuple((lm_eval_tasks or "").split(",")) if lm_eval_tasks else (),
        lm_eval_include=lm_eval_include,
        lm_eval_limit=lm_eval_limit,
        lm_eval_fewshot=lm_eval_fewshot,
        lm_eval_batch_size=lm_eval_batch_size,
    )
    report = run_eval(config)
    for warning in report["warnings"]:
        click.secho(warning, fg="red", err=True)
    if config.mode == "answer":
        click.echo(format_answer_table(report))
        if report.get("table2"):
            click.echo("\nBefore and after RLVR (pass@1; the paper's Table 2):\n" + format_table2(report))
    else:
        click.echo(format_table(report))
        click.echo()
        click.echo(format_band_counts(report))
    paired = format_paired(report)
    if paired:
        click.echo(f"\nPaired differences. {PAIRED_LEGEND}")
        click.echo(paired)
    if report.get("lm_eval"):
        click.echo("\nlm-evaluation-harness:\n" + format_harness(report))
    scaling = format_scaling(report)
    if scaling:
        click.echo()
        click.echo("Scaling fits, P(C) = A / C^alpha + P*:")
        click.echo(scaling)
    if out:
        files = report["files"]
        extra = "".join(f", {files[k]}" for k in ("plot", "lm_eval_plot") if files.get(k))
        click.echo(
            f"\nwrote {files['report_md']}, {files['report_json']}, {files['predictions']}{extra} ({report['seconds']:.1f} s)"
        )
