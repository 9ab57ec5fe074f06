"""Entropy bands: the labels make-tasks gives each task, and eval's splits (paper Sec. 4.1).

    band_of(1.2)                     -> "medium"  (the highest band whose threshold 1.2 exceeds)
    band_sql("entropy")              -> the same rule as a DuckDB CASE expression over a column
    parse_bands("lo=0.3,hi=2")       -> (("lo", 0.3), ("hi", 2.0))
    as_bands({"lo": 0.3, "hi": 2})   -> the same, checked (distinct names, increasing thresholds)

The band rule, in one place, in both forms: above a threshold (strictly), the highest band wins,
else "other"; a missing (None, NULL) or NaN entropy is "other". Bands are nested: a "hard" task
also counts as medium and easy; `band_of` and `band_sql` name only the highest. Of two bands with
the same threshold, the one listed last wins. tests/test_query.py checks that the two forms agree.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from rptdata.errors import BadOption

__all__ = ["DEFAULT_BANDS", "OTHER_BAND", "as_bands", "band_of", "band_sql", "parse_bands"]

OTHER_BAND = "other"
# The paper's evaluation splits (Sec. 4.1): entropy above 0.5 / 1.0 / 1.5, nested.
DEFAULT_BANDS: tuple[tuple[str, float], ...] = (("easy", 0.5), ("medium", 1.0), ("hard", 1.5))
Bands = Sequence[tuple[str, float]] | Mapping[str, float]  # (name, threshold) pairs, or name -> threshold


def _highest_first(bands: Bands) -> list[tuple[str, float]]:
    """The bands in the order the rule tries them: highest threshold first; of equal thresholds,
    the one listed last first."""
    items = list(bands.items() if isinstance(bands, Mapping) else bands)
    order = sorted(range(len(items)), key=lambda i: (-float(items[i][1]), -i))
    return [(str(items[i][0]), float(items[i][1])) for i in order]


def band_of(entropy: float | None, thresholds: Bands = DEFAULT_BANDS) -> str:
    """The highest band whose threshold `entropy` exceeds (strictly), else "other" (also for a
    None or NaN entropy).

    Bands are nested in the paper (Sec. 4.1): a "hard" task also counts as medium and easy
    when you evaluate the medium or easy split; `band` names only the highest.

    >>> band_of(1.2), band_of(1.5), band_of(2.0), band_of(0.1), band_of(float("nan")), band_of(None)
    ('medium', 'medium', 'hard', 'other', 'other', 'other')
    >>> band_of(0.7, {"low": 0.2, "high": 0.6})
    'high'
    """
    if entropy is None or math.isnan(entropy):
        return OTHER_BAND
    return next((name for name, t in _highest_first(thresholds) if entropy > t), OTHER_BAND)


def band_sql(column: str, thresholds: Bands = DEFAULT_BANDS) -> str:
    """`band_of` as a DuckDB expression over a numeric column (NULL and NaN: "other"; DuckDB
    orders NaN above every number, so it is named first).

    >>> print(band_sql("e", {"easy": 0.5, "hard": 1.5}))
    CASE WHEN e IS NULL OR isnan(e) THEN 'other' WHEN e > '1.5'::DOUBLE THEN 'hard' WHEN e > '0.5'::DOUBLE THEN 'easy' ELSE 'other' END
    """
    other = _sql_text(OTHER_BAND)
    cases = "".join(
        f" WHEN {column} > {_sql_number(t)} THEN {_sql_text(name)}" for name, t in _highest_first(thresholds)
    )
    return f"CASE WHEN {column} IS NULL OR isnan({column}) THEN {other}{cases} ELSE {other} END"


def _sql_text(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def _sql_number(t: float) -> str:
    """A threshold as the DOUBLE Python compares with (parsed from its repr, which round-trips; a
    bare 1.1 would be a DECIMAL, and against a FLOAT column compare in float32)."""
    return f"'{float(t)!r}'::DOUBLE"


def parse_bands(text: str) -> tuple[tuple[str, float], ...]:
    """Bands from "0.5,1.0,1.5" (named easy/medium/hard when there are three) or "lo=0.5,hi=2".

    Unnamed lists of another length are named by threshold ("gt0.5", "gt2").

    >>> parse_bands("0.5,1.0,1.5")
    (('easy', 0.5), ('medium', 1.0), ('hard', 1.5))
    >>> parse_bands("lo=0.3,hi=2")
    (('lo', 0.3), ('hi', 2.0))
    >>> parse_bands("1,2")
    (('gt1', 1.0), ('gt2', 2.0))
    """
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise BadOption("--bands needs at least one threshold, e.g. 0.5,1.0,1.5")
    named = ["=" in p for p in parts]
    if any(named) and not all(named):
        raise BadOption(f"--bands {text!r}: name every band (easy=0.5,...) or none")
    try:
        if all(named):
            pairs = [(n.strip(), float(v)) for n, v in (p.split("=", 1) for p in parts)]
        else:
            pairs = _named([float(p) for p in parts])
    except ValueError:
        raise BadOption(f"--bands {text!r}: thresholds must be numbers, e.g. 0.5,1.0,1.5") from None
    return tuple(pairs)


def _named(values: Sequence[float]) -> list[tuple[str, float]]:
    """Unnamed thresholds: easy/medium/hard when there are three, else "gt<threshold>"."""
    names = [n for n, _ in DEFAULT_BANDS] if len(values) == 3 else [f"gt{v:g}" for v in values]
    return list(zip(names, map(float, values)))


def as_bands(
    bands: str | Mapping[str, float] | Sequence[tuple[str, float]] | Sequence[float],
) -> tuple[tuple[str, float], ...]:
    """Bands given as text, a mapping, pairs or bare thresholds -> checked (name, threshold) pairs.

    The one reader of bands: `rpt stats`, make-tasks and eval all take what it takes.
    ValueError unless the names are distinct, non-empty and not "other", and the thresholds
    finite, non-negative (entropy is) and strictly increasing (bands are nested).

    >>> as_bands({"lo": 0.3, "hi": 2})
    (('lo', 0.3), ('hi', 2.0))
    >>> as_bands((0.5, 1.0, 1.5))
    (('easy', 0.5), ('medium', 1.0), ('hard', 1.5))
    >>> as_bands("hi=2,lo=0.3")
    Traceback (most recent call last):
    ...
    rptdata.errors.BadOption: band thresholds must be finite and strictly increasing (bands are nested); got [2.0, 0.3]
    """
    if isinstance(bands, str):
        pairs = parse_bands(bands)
    elif isinstance(bands, Mapping):
        pairs = tuple((str(k), float(v)) for k, v in bands.items())
    elif all(isinstance(b, (int, float)) for b in bands):
        pairs = tuple(_named(list(bands)))
    else:
        pairs = tuple((str(n), float(t)) for n, t in bands)
    if not pairs:
        raise BadOption("--bands needs at least one band")
    names = [n for n, _ in pairs]
    values = [t for _, t in pairs]
    if len(set(names)) != len(names) or OTHER_BAND in names or any(not n for n in names):
        raise BadOption(f"band names must be distinct, non-empty and not {OTHER_BAND!r}; got {names}")
    if any(not math.isfinite(v) for v in values) or any(b <= a for a, b in zip(values, values[1:])):
        raise BadOption(f"band thresholds must be finite and strictly increasing (bands are nested); got {values}")
    if any(v < 0 for v in values):
        raise BadOption(f"band thresholds must be non-negative (entropy is); got {values}")
    return pairs
