"""`make units`' joint table (rpttrain/units_study.py) from reports shaped as `rpt eval` writes them."""

import json

import pytest

from rpttrain.units_study import main, units_table


def _band(correct, n):
    return {"all": {"threshold": None, "n": n, "correct": correct, "accuracy": correct / n}}


def _report(model_rows, bpbs, pair=None, template="sentence", reward="prefix"):
    rows = [
        {"model": f"run@{step}", "run": "run", "step": step, "prompt_template": template, "bands": _band(c, n)}
        for step, c, n in model_rows
    ]
    subjects = [
        {"model": f"run@{step}", "lm_eval": {"rpt_heldout_bpb": {"sample_len": 8, "bits_per_byte,none": bpb}}}
        for (step, _, _), bpb in zip(model_rows, bpbs, strict=True)
    ]
    paired = [] if pair is None else [{"a": rows[-1]["model"], "b": rows[0]["model"], "bands": {"all": pair}}]
    return {
        "tasks_dir": "t",
        "tasks": model_rows[0][2],
        "documents": 5,
        "settings": {"reward": reward, "prompt_template": None},
        "rows": rows,
        "paired": paired,
        "lm_eval": {"subjects": subjects},
    }


SUMMARY = {"steps": 2, "stopped_by": "compute_budget", "flops_of_budget": 0.93, "totals": {"flops": 1.45e12}}


def test_one_line_per_unit_with_base_and_last_checkpoint():
    token = _report([(0, 14, 24), (3, 12, 24)], [0.99626, 0.98116], {"diff": -2 / 24, "p_value": 0.5})
    span = _report([(0, 1, 24), (2, 3, 24)], [0.99626, 0.9951], None, "masked-span", "exact-nocase")
    table = units_table([("token", token, {**SUMMARY, "steps": 3, "stopped_by": None}), ("span", span, SUMMARY)])
    lines = table.splitlines()
    assert lines[2].startswith("| token | sentence, prefix | 3 | 1.45e+12 | 0.93 | steps | 24 (5) |")
    assert "| 58.3 (14/24) | 50.0 (12/24) | -8.3 (p=0.5) | 0.99626 | 0.98116 | 8 |" in lines[2]
    assert lines[3].startswith("| span | masked-span, exact-nocase | 2 | 1.45e+12 | 0.93 | compute_budget |")
    assert "| 4.2 (1/24) | 12.5 (3/24) | – | 0.99626 | 0.99510 | 8 |" in lines[3]
    assert "equal in every report" in table


def test_different_base_bits_per_byte_are_flagged():
    a = _report([(0, 1, 4), (1, 1, 4)], [0.9, 0.8])
    b = _report([(0, 1, 4), (1, 1, 4)], [0.7, 0.8])
    assert "do not compare across units" in units_table([("a", a, SUMMARY), ("b", b, SUMMARY)])


def test_the_command_names_a_missing_report(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps(SUMMARY))
    with pytest.raises(Exception, match="report.json is missing"):
        main(["--unit", "span", str(tmp_path / "eval"), str(run), "--out", str(tmp_path / "r.md")])
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "report.json").write_text(json.dumps(_report([(0, 1, 4), (1, 2, 4)], [0.9, 0.8])))
    main(["--unit", "span", str(tmp_path / "eval"), str(run), "--out", str(tmp_path / "r.md")])
    assert "| span | sentence, prefix | 2 |" in (tmp_path / "r.md").read_text()
    assert "| 25.0 (1/4) | 50.0 (2/4) |" in capsys.readouterr().out
