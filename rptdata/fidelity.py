"""`rpt stats A --compare B`: does scoring A rank difficulty the way scoring B does? (proxy fidelity)

    cmp = compare_scorings("out/scored-proxy", "out/scored-policy", keep_thresholds=(0.5, 1.0, 1.5))
    plot_fidelity(cmp, "out/fidelity.png")

The paper picks hard positions with a 1.5B proxy and evaluates bands with the 14B model; whether
the proxy orders positions the way the bigger model does is left open. Given two scorings of the
SAME prepared corpus (e.g. the proxy's and the policy's), over the positions both kept
(joined on doc_id, pos):

- spearman: Pearson correlation of the average ranks of the two entropies, computed in DuckDB
  (window ranks, out of core: any corpus size);
- kendall: Kendall's tau-b (scipy), exact up to `kendall_sample` positions, else on a seeded
  uniform sample of that many (said in `kendall_positions`);
- bands: the agreement matrix of the disjoint bands (other/easy/medium/hard by `rptdata.bands`:
  the highest band edge the entropy exceeds), rows A, columns B, and the share on the diagonal;
- keep: for each threshold t, the share of B's hard positions (entropy > the last band edge) that
  A keeps at entropy >= t (make-tasks' rule), and the share of all shared positions A keeps there
  (the cost of that recall);
- a scatter plot of a seeded sample (`plot_fidelity`).

Two scorings of different prepared corpora are refused (`BadInput`, naming both manifests): their
positions would not be the same text. Positions only one side kept (a --threshold) are counted,
not compared. Nothing is written but the plot.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from rptdata.bands import OTHER_BAND, as_bands, band_sql
from rptdata.errors import BadInput
from rptdata.io import STAGE_SCORE, read_manifest
from rptdata.models import check_tokenizer
from rptdata.query import parquet_list, save_png

__all__ = ["compare_scorings", "plot_fidelity", "same_corpus"]

KENDALL_SAMPLE = 200_000
PLOT_SAMPLE = 20_000


def same_corpus(a_dir: Path, a: dict, b_dir: Path, b: dict) -> None:
    """Refuse two scored manifests whose prepared corpora differ (by fingerprint, else folder)."""
    pa_, pb = a.get("prepared") or {}, b.get("prepared") or {}
    fa, fb = pa_.get("fingerprint"), pb.get("fingerprint")
    same = fa == fb if fa and fb else Path(str(pa_.get("dir"))).resolve() == Path(str(pb.get("dir"))).resolve()
    if not same or pa_.get("input_shards") != pb.get("input_shards"):
        raise BadInput(
            f"{a_dir / 'manifest.json'} scored the prepared corpus {pa_.get('dir')} (fingerprint {fa}) but "
            f"{b_dir / 'manifest.json'} scored {pb.get('dir')} (fingerprint {fb}); compare two scorings of the same "
            "`rpt prepare` output"
        )
    check_tokenizer(
        a.get("tokenizer"),
        b.get("tokenizer") or {},
        built=f"{a_dir} was scored",
        user=str(b_dir),
        harm="the same position would not be the same token",
        fix="Compare two scorings of the same `rpt prepare` output",
    )


def _ranked_sql(col: str) -> str:
    """Average rank of `col` (ties share the mean of their ranks), as Spearman needs."""
    return f"(rank() OVER (ORDER BY {col}) + (count(*) OVER (PARTITION BY {col}) - 1) / 2.0)"


def compare_scorings(
    a_dir,
    b_dir,
    bands="0.5,1.0,1.5",
    keep_thresholds: Sequence[float] | None = None,
    kendall_sample: int = KENDALL_SAMPLE,
    seed: int = 0,
) -> dict:
    """The fidelity statistics of scoring A against scoring B (see the module docstring)."""
    import duckdb
    import numpy as np
    from scipy.stats import kendalltau

    a_dir, b_dir = Path(a_dir), Path(b_dir)
    ma, mb = read_manifest(a_dir, STAGE_SCORE), read_manifest(b_dir, STAGE_SCORE)
    same_corpus(a_dir, ma, b_dir, mb)
    bands = as_bands(bands)
    hard_name, hard_edge = max(bands, key=lambda x: x[1])
    keep_thresholds = tuple(keep_thresholds) if keep_thresholds else tuple(t for _, t in bands)
    con = duckdb.connect()
    for name, d, m in (("a", a_dir, ma), ("b", b_dir, mb)):
        files = [d / s for s in m["shards"]]
        missing = [str(p) for p in files if not p.exists()]
        if missing:
            raise BadInput(f"{d}: shard(s) listed in the manifest are missing: {', '.join(missing[:3])}")
        if not files:
            raise BadInput(f"{d}: the scoring holds no positions")
        con.execute(f"CREATE VIEW {name} AS SELECT doc_id, pos, entropy FROM read_parquet({parquet_list(files)})")
    con.execute(  # each side's band by the band rule (`rptdata.bands.band_sql`)
        f"CREATE TEMP TABLE j AS SELECT a.entropy AS ea, b.entropy AS eb, {band_sql('a.entropy', bands)} AS band_a, "
        f"{band_sql('b.entropy', bands)} AS band_b FROM a JOIN b USING (doc_id, pos)"
    )
    n_a, n_b, n = (con.execute(f"SELECT count(*) FROM {t}").fetchall()[0][0] for t in ("a", "b", "j"))
    if n < 3:
        raise BadInput(
            f"{a_dir} and {b_dir} share {n} positions; nothing to compare (were both scored with --keep-all?)"
        )
    spearman = con.execute(
        f"SELECT corr(ra, rb) FROM (SELECT {_ranked_sql('ea')} AS ra, {_ranked_sql('eb')} AS rb FROM j)"
    ).fetchall()[0][0]
    pearson = con.execute("SELECT corr(ea, eb) FROM j").fetchall()[0][0]
    if n <= kendall_sample:
        ea, eb = (np.array(c) for c in zip(*con.execute("SELECT ea, eb FROM j").fetchall()))
    else:
        rows = con.execute(
            f"SELECT ea, eb FROM j USING SAMPLE reservoir({int(kendall_sample)} ROWS) REPEATABLE ({int(seed)})"
        ).fetchall()
        ea, eb = (np.array(c) for c in zip(*rows))
    kendall = float(kendalltau(ea, eb).statistic)
    names = [OTHER_BAND] + [name for name, _ in sorted(bands, key=lambda x: x[1])]
    cells = {(r, c): k for r, c, k in con.execute("SELECT band_a, band_b, count(*) FROM j GROUP BY ALL").fetchall()}
    matrix = {r: {c: int(cells.get((r, c), 0)) for c in names} for r in names}
    agree = sum(matrix[x][x] for x in names) / n
    b_hard = sum(matrix[r][hard_name] for r in names)
    keep = []
    for t in keep_thresholds:
        kept_hard, kept = con.execute(
            "SELECT count(*) FILTER (WHERE band_b = ? AND ea >= ?), count(*) FILTER (WHERE ea >= ?) FROM j",
            [hard_name, float(t), float(t)],
        ).fetchall()[0]
        keep.append(
            {
                "threshold": float(t),
                "b_hard_kept": int(kept_hard),
                "b_hard_kept_share": kept_hard / b_hard if b_hard else None,
                "a_kept_share": kept / n,
            }
        )
    sample = con.execute(
        f"SELECT ea, eb FROM j USING SAMPLE reservoir({PLOT_SAMPLE} ROWS) REPEATABLE ({int(seed)})"
    ).fetchall()
    return {
        "a": {
            "dir": str(a_dir),
            "proxy": (ma.get("proxy") or {}).get("name"),
            "options": ma.get("options"),
            "positions": int(n_a),
        },
        "b": {
            "dir": str(b_dir),
            "proxy": (mb.get("proxy") or {}).get("name"),
            "options": mb.get("options"),
            "positions": int(n_b),
        },
        "prepared": (ma.get("prepared") or {}).get("dir"),
        "shared_positions": int(n),
        "spearman": float(spearman),
        "pearson": float(pearson),
        "kendall": kendall,
        "kendall_positions": int(len(ea)),
        "bands": dict(bands),
        "band_names": names,
        "band_matrix": matrix,
        "band_agreement": agree,
        "hard_band": hard_name,
        "hard_edge": hard_edge,
        "b_hard": int(b_hard),
        "keep": keep,
        "sample": [[float(x), float(y)] for x, y in sample],
    }


def plot_fidelity(cmp: dict, path) -> Path:
    """Scatter of A's entropy against B's on a seeded sample of shared positions, band edges marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [p[1] for p in cmp["sample"]]
    ys = [p[0] for p in cmp["sample"]]
    fig, ax = plt.subplots(figsize=(5.2, 5))
    ax.scatter(xs, ys, s=3, alpha=0.25, color="#4C72B0", linewidths=0)
    top = max([*xs, *ys, math.log(16)])
    ax.plot([0, top], [0, top], color="grey", linewidth=0.8, linestyle=":")
    for t in cmp["bands"].values():
        ax.axvline(t, color="#C44E52", linestyle="--", linewidth=0.7)
        ax.axhline(t, color="#C44E52", linestyle="--", linewidth=0.7)
    ax.set_xlabel(f"B: {cmp['b']['proxy']} ({Path(cmp['b']['dir']).name}) entropy, nats")
    ax.set_ylabel(f"A: {cmp['a']['proxy']} ({Path(cmp['a']['dir']).name}) entropy, nats")
    ax.set_title(
        f"{cmp['shared_positions']:,} shared positions: Spearman {cmp['spearman']:.3f}, Kendall {cmp['kendall']:.3f}",
        fontsize=9,
    )
    return save_png(fig, path)
