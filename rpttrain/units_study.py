"""`make units`' joint table: one `rpt eval` report per task unit, gathered into one markdown file.

`rpt eval` reads one tasks directory, so token, sentence and span tasks get one report each; what
compares across units is the training compute (each run's summary.json) and the held-out bits per
byte (lm-eval's `rpt_heldout_bpb`, the same documents for every unit made from one scored corpus
with one split rule). `units_table` is pure: it takes the parsed JSON, returns the markdown.

    python -m rpttrain.units_study --unit token out/units/eval-token out/cmp-rpt \\
        --unit span out/units/eval-span out/unit-span --out out/units/report.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rptdata.errors import RptError

BPB_TASK = "rpt_heldout_bpb"
BPB_METRIC = "bits_per_byte,none"


def _rows_by_step(report: dict) -> tuple[dict, dict]:
    """The report's reasoning rows of its one run: the base model (step 0) and the last checkpoint."""
    rows = [r for r in report.get("rows", []) if r.get("step") is not None]
    if not rows:
        raise RptError(f"eval report of {report.get('tasks_dir')} has no checkpoint rows")
    rows.sort(key=lambda r: r["step"])
    return rows[0], rows[-1]


def _bpb(report: dict, model: str) -> tuple[float | None, int | None]:
    for subject in (report.get("lm_eval") or {}).get("subjects", []):
        if subject.get("model") == model:
            task = (subject.get("lm_eval") or {}).get(BPB_TASK) or {}
            return task.get(BPB_METRIC), task.get("sample_len")
    return None, None


def _paired(report: dict, a: str, b: str) -> dict | None:
    for pair in report.get("paired", []):
        if pair.get("a") == a and pair.get("b") == b:
            return pair["bands"]["all"]
    return None


def _cell(band: dict) -> str:
    return f"{100 * band['accuracy']:.1f} ({band['correct']:g}/{band['n']})"


def _num(value: float | None, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def units_table(units: list[tuple[str, dict, dict]]) -> str:
    """Markdown table, one line per (unit name, eval report.json, run summary.json)."""
    lines = [
        "| unit | format, reward | steps | FLOPs | of budget | stopped by | eval tasks (docs) "
        "| accuracy % base | accuracy % trained | trained − base (p) | bpb base | bpb trained | bpb docs |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base_bpbs = set()
    for name, report, summary in units:
        base, last = _rows_by_step(report)
        settings = report.get("settings", {})
        template = last.get("prompt_template") or settings.get("prompt_template") or "–"
        pair = _paired(report, last["model"], base["model"])
        diff = "–" if pair is None else f"{100 * pair['diff']:+.1f} (p={pair['p_value']:.2g})"
        bpb_base, docs = _bpb(report, base["model"])
        bpb_last, _ = _bpb(report, last["model"])
        if bpb_base is not None:
            base_bpbs.add(round(bpb_base, 9))
        fraction = summary.get("flops_of_budget")
        lines.append(
            f"| {name} | {template}, {settings.get('reward')} | {summary['steps']} "
            f"| {summary['totals']['flops']:.3g} | {_num(fraction, '.2f')} | {summary.get('stopped_by') or 'steps'} "
            f"| {report['tasks']} ({report['documents']}) | {_cell(base['bands']['all'])} "
            f"| {_cell(last['bands']['all'])} | {diff} | {_num(bpb_base, '.5f')} | {_num(bpb_last, '.5f')} "
            f"| {_num(docs, 'd')} |"
        )
    if len(base_bpbs) > 1:
        lines.append(
            "\nThe base model's bits per byte differ between the reports: they did not read the same "
            "held-out documents, so the bpb columns do not compare across units."
        )
    elif base_bpbs:
        lines.append(
            "\nThe base model's bits per byte are equal in every report: all units read the same held-out documents."
        )
    return "\n".join(lines) + "\n"


def _load(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise RptError(f"{path} is missing") from None
    except json.JSONDecodeError as error:
        raise RptError(f"{path}: not JSON ({error})") from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rpttrain.units_study", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--unit",
        nargs=3,
        action="append",
        required=True,
        metavar=("NAME", "EVAL_DIR", "RUN_DIR"),
        help="a unit's name, its `rpt eval` output folder and its `rpt train` run folder (repeat)",
    )
    parser.add_argument("--out", type=Path, required=True, help="the markdown file to write")
    args = parser.parse_args(argv)
    units = [
        (name, _load(Path(eval_dir) / "report.json"), _load(Path(run_dir) / "summary.json"))
        for name, eval_dir, run_dir in args.unit
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("# Token, sentence and span tasks at one compute budget\n\n" + units_table(units))
    print(args.out.read_text(), end="")


if __name__ == "__main__":
    try:
        main()
    except RptError as error:
        raise SystemExit(f"error: {error}") from None
