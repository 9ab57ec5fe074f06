"""`rpt query` and `rpt stats`: DuckDB over a scored directory.

    con = connect("out/scored")              # views: positions (scored shards), docs (prepared shards)
    con.sql("SELECT count(*) FROM positions WHERE entropy > 1.5").fetchall()
    export_query("out/scored", "SELECT * FROM positions", "hard.parquet", "parquet")
    stats = compute_stats("out/scored", bands="easy=0.5,medium=1.0,hard=1.5")
    plot_entropy_hist(stats, "out/scored/entropy_hist.png")

The `docs` view reads the prepared shards named by the scored manifest (its `prepared.dir`);
pass `prepared=` when that folder has moved. Views read only finished shards (the names the
manifests list), never temporary files.

Bands (as in the paper's evaluation splits): nested, positions with entropy > b for each b
(easy > 0.5 contains medium > 1.0 contains hard > 1.5), and disjoint, [0, b1], (b1, b2], ...,
(bn, inf). Shares are of all scored positions (from the manifest). A band that reaches below the
run's --threshold is incomplete (those positions were not kept), and is reported as such.

Left out on purpose: any write access (the connection is in-memory; the files are read-only
here), and plots other than the histogram (export the rows and plot them as you like).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

from rptdata.bands import DEFAULT_BANDS, OTHER_BAND, as_bands, band_sql
from rptdata.errors import BadInput, BadOption, MissingUpstream
from rptdata.io import STAGE_PREPARE, STAGE_SCORE, atomic_file, read_manifest

log = logging.getLogger(__name__)

STAGE = STAGE_SCORE
FORMATS = ("csv", "json", "parquet")
QUANTILES = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0)
_EMPTY_POSITIONS = (
    "SELECT NULL::VARCHAR AS doc_id, NULL::INTEGER AS pos, NULL::INTEGER AS token_id, NULL::FLOAT AS entropy, "
    "NULL::FLOAT AS target_logprob, NULL::INTEGER AS target_rank, NULL::INTEGER AS top1_id WHERE false"
)


def _sql_str(s: str) -> str:
    return "'" + str(s).replace("'", "''") + "'"


def _one(con, sql: str) -> tuple:
    """The first row of a query (fetching everything, as DuckDB 2 wants results finished)."""
    return con.execute(sql).fetchall()[0]


def parquet_list(paths: Sequence[Path]) -> str:
    return "[" + ", ".join(_sql_str(p) for p in paths) + "]"


def connect(scored_dir: str | Path, prepared: str | Path | None = None):
    """An in-memory DuckDB connection with the views `positions` and `docs`."""
    import duckdb

    scored_dir = Path(scored_dir)
    manifest = read_manifest(scored_dir, STAGE)
    con = duckdb.connect()
    files = [scored_dir / s for s in manifest["shards"]]
    missing = [str(p) for p in files if not p.exists()]
    if missing:
        raise MissingUpstream(f"{scored_dir}: shard(s) listed in the manifest are missing: {', '.join(missing[:3])}")
    source = f"read_parquet({parquet_list(files)})" if files else f"({_EMPTY_POSITIONS})"
    con.execute(f"CREATE VIEW positions AS SELECT * FROM {source}")

    prep_dir = Path(prepared) if prepared else Path(manifest["prepared"]["dir"])
    try:
        prep = read_manifest(prep_dir, STAGE_PREPARE)
    except MissingUpstream as e:
        if prepared:  # asked for explicitly: say so now
            raise
        log.warning("no docs view: %s (pass --prepared DIR if the prepared folder moved)", e)
        return con
    doc_files = [prep_dir / s for s in prep["shards"]]
    if doc_files:
        con.execute(f"CREATE VIEW docs AS SELECT * FROM read_parquet({parquet_list(doc_files)})")
    return con


def run_sql(con, sql: str):
    """con.sql(sql) with DuckDB's errors turned into BadInput (with a hint for a missing docs view)."""
    import duckdb

    try:
        return con.sql(sql)
    except duckdb.Error as e:
        hint = ""
        if "docs" in str(e) and "does not exist" in str(e):
            hint = " (the docs view needs the prepared directory; pass --prepared DIR)"
        raise BadInput(f"query failed: {e}{hint}") from e


def query_rows(scored_dir, sql: str, prepared=None) -> tuple[list[str], list[tuple]]:
    """(column names, rows) of a query over a scored directory."""
    con = connect(scored_dir, prepared)
    rel = run_sql(con, sql)
    if rel is None:  # a statement without a result
        return [], []
    return list(rel.columns), rel.fetchall()


def export_query(scored_dir, sql: str, path: str | Path, fmt: str, prepared=None) -> int:
    """Write the query's result to `path` as csv (with header), json (an array) or parquet; returns rows."""
    import duckdb

    if fmt not in FORMATS:
        raise BadOption(f"format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    con = connect(scored_dir, prepared)
    options = {"csv": "FORMAT csv, HEADER true", "json": "FORMAT json, ARRAY true", "parquet": "FORMAT parquet"}[fmt]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(Path(path)) as tmp:
        try:
            n = _one(con, f"COPY ({sql.strip().rstrip(';')}) TO {_sql_str(tmp)} ({options})")[0]
        except duckdb.Error as e:
            raise BadInput(f"query failed: {e}") from e
    return int(n)


# ---------------------------------------------------------------------------------------------
# stats


def compute_stats(scored_dir, bands=DEFAULT_BANDS, bins: int = 50) -> dict:
    """Counts, entropy quantiles, nested and disjoint band shares and proxy accuracy, histogram.

    `bands`: anything `rptdata.bands.as_bands` reads ("0.5,1.0,1.5", "easy=0.5,hard=1.5", pairs).
    """
    named = as_bands(bands)
    bands = tuple(t for _, t in named)
    manifest = read_manifest(scored_dir, STAGE)
    con = connect(scored_dir)
    opts, counts = manifest["options"], manifest["counts"]
    threshold = 0.0 if opts.get("keep_all") else float(opts.get("threshold") or 0.0)
    scored = int(counts["positions_scored"])

    # per disjoint band, by the band rule (`rptdata.bands.band_sql`): positions, positions the proxy
    # got right, positions with a top-1 to judge, and their entropies' sum; nested bands add them up
    cells = {
        row[0]: row[1:]
        for row in con.execute(
            f"SELECT {band_sql('entropy', named)} AS band, count(*), sum((top1_id = token_id)::DOUBLE), "
            "count(top1_id = token_id), sum(entropy) FROM positions GROUP BY band"
        ).fetchall()
    }
    order = [OTHER_BAND, *(name for name, _ in named)]  # as_bands: thresholds increasing

    def band(members: list[str], complete: bool) -> dict:
        n, right, judged, total = (sum(cells[m][k] or 0 for m in members if m in cells) for k in range(4))
        return {
            "positions": int(n),
            "share": (n / scored if scored else None) if complete else None,
            "accuracy": right / judged if judged else None,
            "mean_entropy": total / n if n else None,
            "complete": complete,
        }

    kept, mean, acc = _one(con, "SELECT count(*), avg(entropy), avg((top1_id = token_id)::DOUBLE) FROM positions")
    quantiles = None
    if kept:
        values = _one(con, f"SELECT quantile_cont(entropy, {list(QUANTILES)}) FROM positions")[0]
        quantiles = {f"{q:g}": float(v) for q, v in zip(QUANTILES, values)}
    nested = [
        {"band": f"{name} > {b:g}", "name": name, "low": b, **band(order[i + 1 :], b >= threshold)}
        for i, (name, b) in enumerate(named)
    ]
    edges = [0.0, *bands]
    disjoint = []
    for i, (lo, hi) in enumerate(zip(edges, [*bands, math.inf])):
        label = f"({lo}, {hi}]" if lo > 0 else f"[0, {hi}]"
        if hi == math.inf:
            label = f"> {lo}"
        disjoint.append(
            {"band": label, "low": lo, "high": None if hi == math.inf else hi, **band([order[i]], lo >= threshold)}
        )

    top = math.log(max(int(opts.get("top_k", 16)), 2))
    width = top / bins
    hist_rows = con.execute(
        f"SELECT least(greatest(floor(entropy / {width!r}), 0), {bins - 1})::INTEGER AS b, count(*) "
        "FROM positions GROUP BY b ORDER BY b"
    ).fetchall()
    hist = [0] * bins
    for b, n in hist_rows:
        hist[b] = int(n)
    return {
        "scored_dir": str(scored_dir),
        "proxy": manifest["proxy"]["name"],
        "entropy_mode": opts.get("entropy"),
        "top_k": opts.get("top_k"),
        "threshold": None if opts.get("keep_all") else threshold,
        "documents": counts["documents"],
        "positions_scored": scored,
        "positions_kept": int(kept),
        "positions_skipped_short_context": counts["positions_skipped_short_context"],
        "mean_entropy": mean,
        "accuracy": acc,
        "quantiles": quantiles,
        "bands": list(bands),
        "band_names": [name for name, _ in named],
        "nested": nested,
        "disjoint": disjoint,
        "histogram": {"edges": [i * width for i in range(bins + 1)], "counts": hist},
    }


def plot_entropy_hist(stats: dict, path: str | Path) -> Path:
    """Write a PNG histogram of the kept positions' entropy, with the bands marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edges, counts = stats["histogram"]["edges"], stats["histogram"]["counts"]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(edges[:-1], counts, width=edges[1] - edges[0], align="edge", color="#4C72B0", edgecolor="white")
    for b in stats["bands"]:
        ax.axvline(b, color="#C44E52", linestyle="--", linewidth=1)
        ax.text(b, ax.get_ylim()[1] * 0.95, f" {b:g}", color="#C44E52", va="top", fontsize=8)
    if stats["threshold"]:
        ax.axvspan(
            0,
            stats["threshold"],
            color="grey",
            alpha=0.15,
            label=f"below --threshold {stats['threshold']:g} (not kept)",
        )
        ax.legend(loc="upper right", fontsize=8)
    ax.set_xlabel(f"top-{stats['top_k']} entropy ({stats['entropy_mode']}, nats)")
    ax.set_ylabel("positions")
    ax.set_title(f"{stats['proxy']}: {stats['positions_kept']:,} of {stats['positions_scored']:,} scored positions")
    return save_png(fig, path)


def save_png(fig, path: str | Path) -> Path:
    """Write a matplotlib figure as PNG under a temporary name, then rename; close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_file(path) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)
    return path
