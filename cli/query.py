from __future__ import annotations

import csv
import io
import json

import click

from cli.common import library_errors


@click.command()
@click.argument("scored_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("sql")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "csv", "json", "parquet"]),
    default="table",
    show_default=True,
    help="Output format; parquet needs --output. With --output, table means: guess from the file name.",
)
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False),
    default=None,
    help="Write the whole result to this file instead of stdout.",
)
@click.option(
    "--prepared",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    help="The prepared directory for the docs view [default: the one recorded in the scored manifest].",
)
@click.option("--max-rows", type=int, default=50, show_default=True, help="Rows shown by --format table.")
@library_errors
def query(scored_dir, sql, fmt, output, prepared, max_rows):
    """Run SQL (DuckDB) over a scored directory.

    \b
    Views:
      positions  doc_id, pos, token_id, entropy, target_logprob, target_rank, top1_id [, topk_ids, topk_logprobs]
      docs       doc_id, source, text, token_ids, token_end_bytes, n_tokens   (the prepared shards)

    \b
    Example:
      rpt query out/scored "SELECT count(*) AS hard FROM positions WHERE entropy > 1.5"
      rpt query out/scored "SELECT doc_id, avg(entropy) AS h FROM positions GROUP BY doc_id ORDER BY h DESC LIMIT 5"
      rpt query out/scored "SELECT * FROM positions WHERE entropy > 1.0" --format parquet --output hard.parquet
    """
    from rptdata.query import export_query, query_rows

    if output:
        if fmt == "table":
            fmt = {"csv": "csv", "json": "json"}.get(output.rsplit(".", 1)[-1].lower(), "parquet")
        n = export_query(scored_dir, sql, output, fmt, prepared=prepared)
        click.echo(f"query: {n:,} row(s) -> {output} ({fmt})")
        return
    if fmt == "parquet":
        raise click.UsageError("--format parquet needs --output FILE")
    columns, rows = query_rows(scored_dir, sql, prepared)
    if fmt == "table":
        click.echo(_table(columns, rows, max_rows))
    elif fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows(rows)
        click.echo(buf.getvalue(), nl=False)
    else:
        click.echo(json.dumps([dict(zip(columns, r)) for r in rows], default=str, ensure_ascii=False, indent=1))


def _cell(v) -> str:
    if v is None:
        return "NULL"
    if isinstance(v, float):
        return f"{v:.6g}"
    text = str(v).replace("\n", "\\n")
    return text if len(text) <= 60 else text[:57] + "..."


def _table(columns: list[str], rows: list[tuple], max_rows: int) -> str:
    if not columns:
        return "(no result)"
    shown = [[_cell(v) for v in r] for r in rows[:max_rows]]
    widths = [max([len(c)] + [len(r[i]) for r in shown]) for i, c in enumerate(columns)]
    numeric = [
        all(isinstance(r[i], (int, float)) for r in rows[:max_rows] if r[i] is not None) for i in range(len(columns))
    ]

    def line(cells):
        return "  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(cells, widths, numeric)).rstrip()

    out = [line(columns), line(["-" * w for w in widths])] + [line(r) for r in shown]
    more = f" (showing the first {max_rows}; --max-rows or --output for more)" if len(rows) > max_rows else ""
    out.append(f"({len(rows):,} row{'s' if len(rows) != 1 else ''}{more})")
    return "\n".join(out)
