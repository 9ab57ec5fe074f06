from __future__ import annotations

import click

from cli.common import library_errors


@click.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--out", default=None, type=click.Path(dir_okay=False), help="PNG path [default: RUN_DIR/curves.png].")
@library_errors
def plot(run_dir, out):
    """Plot a training run's curves (reward/accuracy/length, or loss/accuracy/entropy) as a PNG.

    \b
    Example:
      rpt plot out/demo/run
    """
    from rpttrain.plot import plot_run

    click.echo(f"plot: {plot_run(run_dir, out)}")
