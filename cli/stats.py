from __future__ import annotations

import json
from pathlib import Path

import click

from cli.common import library_errors


@click.command()
@click.argument("scored_dir", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--bands",
    default="0.5,1.0,1.5",
    show_default=True,
    help="Entropy bands, as make-tasks and eval take them: thresholds (0.5,1.0,1.5 = easy,medium,hard) or named "
    "(easy=0.5,hard=1.5). Nested bands are entropy > threshold; disjoint ones lie between thresholds.",
)
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Where to write the entropy histogram PNG [default: SCORED_DIR/entropy_hist.png].",
)
@click.option("--no-plot", is_flag=True, help="Skip the histogram.")
@click.option("--json", "as_json", is_flag=True, help="Print the statistics as JSON.")
@click.option(
    "--compare",
    "compare_dir",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    help="A second scoring of the same prepared corpus (e.g. the policy's): rank correlations, band agreement, "
    "hard-position recall, scatter plot [default plot: SCORED_DIR/fidelity.png].",
)
@click.option(
    "--keep-threshold",
    "keep_thresholds",
    type=float,
    multiple=True,
    help="With --compare: thresholds at which to report the share of the compared scoring's hard positions "
    "SCORED_DIR keeps (repeat) [default: the band edges].",
)
@library_errors
def stats(scored_dir, bands, plot_path, no_plot, as_json, compare_dir, keep_thresholds):
    """Entropy statistics of a scored directory: counts, quantiles, bands, proxy accuracy.

    Shares are of all scored positions; accuracy is the proxy's next-token accuracy
    (top1_id = token_id) within the band. Bands reaching below the run's --threshold are
    marked incomplete (those positions were not kept).

    \b
    Example:
      rpt stats out/scored
      rpt stats out/scored --bands 0.5,1.0,1.5,2.0 --plot entropy.png
      rpt stats out/scored --bands easy=0.5,hard=1.5
      rpt stats out/scored-proxy --compare out/scored-policy --keep-threshold 1.0
    """
    if compare_dir is not None:
        return _compare(scored_dir, compare_dir, bands, keep_thresholds, plot_path, no_plot, as_json)
    from rptdata.query import compute_stats, plot_entropy_hist

    s = compute_stats(scored_dir, bands)
    path = None if no_plot else plot_entropy_hist(s, plot_path or Path(scored_dir) / "entropy_hist.png")
    if as_json:
        click.echo(json.dumps({**s, "plot": str(path) if path else None}, indent=1, default=str))
        return
    threshold = "none (all positions kept)" if s["threshold"] is None else f"entropy >= {s['threshold']:g}"
    click.echo(f"proxy {s['proxy']}, top-{s['top_k']} entropy ({s['entropy_mode']}), threshold: {threshold}")
    click.echo(
        f"documents {s['documents']:,}; positions scored {s['positions_scored']:,}, kept {s['positions_kept']:,}, "
        f"skipped (short context) {s['positions_skipped_short_context']:,}"
    )
    if s["quantiles"]:
        click.echo("entropy quantiles (kept): " + ", ".join(f"q{k}={v:.3f}" for k, v in s["quantiles"].items()))
        click.echo(f"mean entropy {s['mean_entropy']:.3f}, proxy accuracy {s['accuracy']:.1%} (kept positions)")
    for title, rows in (("nested bands", s["nested"]), ("disjoint bands", s["disjoint"])):
        click.echo(f"\n{title}:")
        click.echo(f"  {'band':<18}{'positions':>11}{'share':>9}{'accuracy':>10}")
        for r in rows:
            share = f"{r['share']:.1%}" if r["share"] is not None else "n/a"
            acc = f"{r['accuracy']:.1%}" if r["accuracy"] is not None else "-"
            note = "" if r["complete"] else "  (incomplete: below --threshold)"
            click.echo(f"  {r['band']:<18}{r['positions']:>11,}{share:>9}{acc:>10}{note}")
    if path:
        click.echo(f"\nhistogram: {path}")


def _compare(a_dir, b_dir, bands, keep_thresholds, plot_path, no_plot, as_json):
    from rptdata.fidelity import compare_scorings, plot_fidelity

    c = compare_scorings(a_dir, b_dir, bands, keep_thresholds)
    path = None if no_plot else plot_fidelity(c, plot_path or Path(a_dir) / "fidelity.png")
    if as_json:
        click.echo(
            json.dumps(
                {**{k: v for k, v in c.items() if k != "sample"}, "plot": str(path) if path else None},
                indent=1,
                default=str,
            )
        )
        return
    click.echo(
        f"A {a_dir} ({c['a']['proxy']}, {c['a']['positions']:,} positions) against "
        f"B {b_dir} ({c['b']['proxy']}, {c['b']['positions']:,} positions): {c['shared_positions']:,} shared"
    )
    click.echo(
        f"entropy correlation: Spearman {c['spearman']:.4f}, Kendall tau-b {c['kendall']:.4f}"
        + ("" if c["kendall_positions"] == c["shared_positions"] else f" (on a sample of {c['kendall_positions']:,})")
        + f", Pearson {c['pearson']:.4f}"
    )
    names = c["band_names"]
    click.echo(f"\nband agreement (rows A, columns B; {c['band_agreement']:.1%} on the diagonal):")
    click.echo("  " + "A \\ B".ljust(10) + "".join(f"{n:>10}" for n in names))
    for r in names:
        click.echo("  " + f"{r:<10}" + "".join(f"{c['band_matrix'][r][col]:>10,}" for col in names))
    click.echo(f"\nB's {c['hard_band']} positions (entropy > {c['hard_edge']:g}): {c['b_hard']:,}")
    for k in c["keep"]:
        share = "n/a" if k["b_hard_kept_share"] is None else f"{k['b_hard_kept_share']:.1%}"
        click.echo(
            f"  A keeps at entropy >= {k['threshold']:g}: {share} of them, {k['a_kept_share']:.1%} of all shared positions"
        )
    if path:
        click.echo(f"\nscatter: {path}")
