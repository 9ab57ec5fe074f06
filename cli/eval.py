from __future__ import annotations

import click

from cli.common import config_options, config_values, library_errors
from rpttrain.eval.config import EvalConfig

# options are generated from EvalConfig's fields (help texts included), as `rpt train`'s are from
# TrainConfig's: every option is a field, and a new field is a new option


@click.command("eval")
@click.argument("tasks_dir", type=click.Path(exists=True, file_okay=False))
@config_options(EvalConfig, skip=("tasks_dir",))
@library_errors
def eval_cmd(tasks_dir, **options):
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
        format_answer_table,
        format_band_counts,
        format_paired,
        format_scaling,
        format_table,
        format_table2,
        run_eval,
    )
    from rpttrain.eval.harness_report import format_harness

    values = config_values(EvalConfig, {**options, "tasks_dir": tasks_dir})
    if not values["models"] and not values["checkpoints"]:
        values["models"] = ("smollm2-135m",)
    config = EvalConfig(**values)
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
    if config.out:
        files = report["files"]
        extra = "".join(f", {files[k]}" for k in ("plot", "lm_eval_plot") if files.get(k))
        click.echo(
            f"\nwrote {files['report_md']}, {files['report_json']}, {files['predictions']}{extra} ({report['seconds']:.1f} s)"
        )
