from __future__ import annotations

import sys

import click

from cli.common import library_errors


def _is_tty() -> bool:
    return sys.stdout.isatty()


@click.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--step",
    "steps",
    multiple=True,
    help="Only these steps: N, A-B (inclusive), A- (from A on) or last; a comma-separated list or repeated.",
)
@click.option(
    "--band",
    "bands",
    multiple=True,
    help="Only tasks of this entropy band (the highest one a task exceeds: easy, medium, hard, other); repeatable.",
)
@click.option(
    "--right/--wrong",
    default=None,
    help="Only right predictions (the run's `correct`; reward 1 where not recorded), or only wrong ones.",
)
@click.option("--missing", is_flag=True, help="Only samples with no prediction (null: e.g. no \\boxed{}).")
@click.option(
    "--context-chars",
    default=300,
    show_default=True,
    type=click.IntRange(min=0),
    help="Show the last N characters of each context (0: all of it).",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "jsonl"]),
    default=None,
    help="table (the default on a terminal, paged) or jsonl (the default when piped or redirected).",
)
@click.option("--limit", type=click.IntRange(min=1), default=None, help="At most N samples: the first that match.")
@library_errors
def samples(run_dir, steps, bands, right, missing, context_chars, fmt, limit):
    """Show what the policy wrote during training: RUN_DIR/samples.jsonl (every --sample-every
    steps), each sample's step, band, context tail, completion, prediction, target and reward.

    \b
    Example:
      rpt samples out/run --step last --wrong
      rpt samples out/run --step 10-20 --band hard --right --format jsonl
    """
    from rpttrain.samples import filter_samples, format_table, read_samples, select_steps, steps_of, summarize, to_jsonl

    found = read_samples(run_dir)
    chosen = select_steps(steps, steps_of(found.lines)) if steps else None
    picked = filter_samples(found.lines, steps=chosen, bands=bands, right=right, missing=missing)
    if found.torn:
        click.echo(f"{found.path}: its last line was cut short (a run stopped while writing it); left out", err=True)
    tty = _is_tty()
    fmt = fmt or ("table" if tty else "jsonl")
    if not picked:
        click.echo(f"no samples match in {found.path}: it holds {summarize(found.lines)}", err=True)
        return
    shown = picked[:limit] if limit else picked
    if fmt == "jsonl":
        text = to_jsonl(shown, context_chars)
    else:
        text = f"{found.path}: {len(shown)} of {len(picked)} matching samples; it holds {summarize(found.lines)}\n\n"
        text += format_table(shown, context_chars)
    if tty:
        click.echo_via_pager(text)
    else:
        click.echo(text, nl=False)
    if len(shown) < len(picked):
        click.echo(f"{len(picked) - len(shown)} more match; raise --limit or narrow with --step/--band", err=True)
