from __future__ import annotations

import json
import sys

import click

from cli.common import library_errors


@click.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option("--deep", is_flag=True, help="Also decode every shard and compare its rows with its marker's count.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@library_errors
def verify(directory, deep, as_json):
    """Check a stage's output directory without running anything: manifest, completion markers,
    every shard's size and sha256 (a train run: every checkpoint's files). Exit 0 when clean,
    1 with the damaged files and the command that rebuilds them.

    \b
    Example:
      rpt verify out/scored
      rpt verify out/tasks --deep
      rpt verify out/run
    """
    from rptdata.verify import verify_dir

    report = verify_dir(directory, deep=deep)
    if as_json:
        click.echo(json.dumps(report, indent=1))
    elif not report["problems"]:
        click.echo(
            f"{directory}: rpt {report['stage']} output, {report['checked']} files checked"
            f"{' (deep)' if deep else ''}, none damaged"
        )
    else:
        click.echo(f"{directory}: {len(report['problems'])} damaged file(s):", err=True)
        for p in report["problems"]:
            click.echo(f"  {p['file']}: {p['problem']}", err=True)
        click.echo(report["rebuild"], err=True)
    sys.exit(1 if report["problems"] else 0)
