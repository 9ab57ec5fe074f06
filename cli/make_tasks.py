from __future__ import annotations

import click

from cli.common import library_errors, no_progress_option, overwrite_option


@click.command("make-tasks")
@click.argument("scored_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="Output directory (train/ and eval/ shards + manifest.json).")
@click.option("--threshold", default=0.5, show_default=True, type=float, help="Keep positions whose proxy entropy is at least this (0 keeps all).")
@click.option("--context-tokens", default=1024, show_default=True, type=int, help="At most this many tokens of context before each position.")
@click.option("--continuation-tokens", default=8, show_default=True, type=int, help="Tokens in each continuation (the longest prediction that can score).")
@click.option("--eval-fraction", default=0.1, show_default=True, type=float, help="Share of documents held out for evaluation (seeded hash of doc_id).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seeds the document split and the --max-tasks sample.")
@click.option("--max-tasks", default=None, type=int, help="Keep at most N training tasks (a seeded, exact, uniform sample). Default: all.")
@click.option("--max-eval-tasks", default=None, type=int, help="Keep at most N evaluation tasks (same sampling). Default: all.")
@click.option("--bands", default="0.5,1.0,1.5", show_default=True, help="Entropy thresholds of the bands: 3 values name easy/medium/hard; or name=value,... A task's band is the highest it exceeds.")
@click.option("--prepared", "prepared_dir", default=None, type=click.Path(exists=True, file_okay=False), help="The `rpt prepare` directory, if it moved since scoring (default: the one the scored manifest names).")
@overwrite_option
@no_progress_option
@library_errors
def make_tasks(scored_dir, out, threshold, context_tokens, continuation_tokens, eval_fraction, seed, max_tasks, max_eval_tasks, bands, prepared_dir, overwrite, no_progress):
    """Turn scored positions into RPT tasks: context, continuation and token boundaries.

    SCORED_DIR is a finished `rpt score-entropy` directory. Documents are split into train and
    eval by a seeded hash of their id, so no evaluation document is ever trained on.

    \b
    Example:
      rpt make-tasks out/scored --out out/tasks
      rpt make-tasks out/scored --out out/tasks --threshold 1.0 --max-tasks 20000 --max-eval-tasks 1000
    """
    from rptdata.tasks import MakeTasksConfig, run_make_tasks

    config = MakeTasksConfig(
        scored_dir=scored_dir, out=out, threshold=threshold, context_tokens=context_tokens,
        continuation_tokens=continuation_tokens, eval_fraction=eval_fraction, seed=seed, max_tasks=max_tasks,
        max_eval_tasks=max_eval_tasks, bands=bands, prepared_dir=prepared_dir, overwrite=overwrite,
        progress=not no_progress,
    )
    m = run_make_tasks(config)
    c = m["counts"]
    skipped = ", ".join(f"{k} {v:,}" for k, v in c["skipped"].items() if v) or "none"
    bands_line = "; ".join(
        f"{split}: " + ", ".join(f"{b} {n:,}" for b, n in c["tasks_by_band"][split].items()) for split in ("train", "eval")
    )
    click.echo(
        f"make-tasks: {c['positions_in']:,} positions -> {c['tasks']['train']:,} train tasks "
        f"({c['documents']['train']:,} docs), {c['tasks']['eval']:,} eval tasks ({c['documents']['eval']:,} docs); "
        f"skipped: {skipped} -> {out} ({m['seconds']:.1f} s)\n  bands (highest exceeded): {bands_line}"
    )
