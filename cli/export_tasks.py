from __future__ import annotations

import click

from cli.common import library_errors, model_help, no_progress_option, overwrite_option


@click.command("export-tasks")
@click.argument("tasks_dir", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--format",
    "format_",
    required=True,
    type=click.Choice(["verl", "trl"]),
    help="Which trainer's dataset layout to write.",
)
@click.option(
    "--out",
    "-o",
    required=True,
    type=click.Path(file_okay=False),
    help="Output folder: train.parquet, eval.parquet, manifest.json.",
)
@click.option(
    "--split",
    default="both",
    show_default=True,
    type=click.Choice(["train", "eval", "both"]),
    help="Which split(s) to export.",
)
@click.option(
    "--prompt-template",
    default="v0",
    show_default=True,
    help="v0, v2, v6, continuation (raw text, for base models), answer (answer tasks), or a template file holding {context} once.",
)
@click.option(
    "--reward",
    default="prefix",
    show_default=True,
    type=click.Choice(["prefix", "first-token", "exact", "exact-nocase", "math"]),
    help="The reward each row asks for (paper Eq. 3 prefix matching, App. A first-token; exact, exact-nocase: "
    "sentence and span tasks, equal after NFC and whitespace folding; math: answer tasks, math-verify on the final "
    "answer).",
)
@click.option(
    "--tokenizer",
    default=None,
    help=model_help("Also store the exact prompt string rendered with this tokenizer's chat template (prompt_text)"),
)
@overwrite_option
@no_progress_option
@library_errors
def export_tasks(tasks_dir, format_, out, split, prompt_template, reward, tokenizer, overwrite, no_progress):
    """Write RPT tasks as a verl or TRL training dataset (parquet).

    TASKS_DIR is a finished `rpt make-tasks` directory. See docs/tasks.md for the columns and
    the trainer command lines.

    \b
    Example:
      rpt export-tasks out/tasks --format verl --out out/verl
      rpt export-tasks out/tasks --format trl --out out/trl --prompt-template continuation
    """
    from rpttrain.export import ExportConfig, run_export_tasks

    config = ExportConfig(
        tasks_dir=tasks_dir,
        out=out,
        format=format_,
        split=split,
        prompt_template=prompt_template,
        reward=reward,
        tokenizer=tokenizer,
        overwrite=overwrite,
        progress=not no_progress,
    )
    m = run_export_tasks(config)
    rows = ", ".join(f"{split} {n:,} rows -> {m['files'][split]}" for split, n in m["rows"].items())
    click.echo(
        f"export-tasks ({m['format']}, prompt {m['prompt_template']}, reward {m['reward']}): {rows} ({m['seconds']:.1f} s)"
    )
    if m["format"] == "verl":
        click.echo(f"  verl: {' '.join(m['verl_overrides'])}")
        click.echo("  or let `rpt train --backend verl` write the whole launch (docs/tasks.md)")
    else:
        click.echo("  TRL: GRPOTrainer(..., reward_funcs=rpttrain.integrations.trl.rpt_reward, train_dataset=...)")
