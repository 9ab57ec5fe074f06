"""What the policy wrote during training: RUN/samples.jsonl read back, filtered and shown (`rpt samples`).

    found = read_samples("out/run")                     # Samples: path, lines (dicts), torn
    steps = select_steps(["1-3", "last"], steps_of(found.lines))
    picked = filter_samples(found.lines, steps=steps, bands=("hard",), right=False, missing=False)
    print(format_table(picked, context_chars=300))      # or to_jsonl(picked, 300)

Every --sample-every steps `rpt train` appends the completions of two groups to samples.jsonl
(`rpttrain.step_record`), the TRL backend up to 16 of the step's completions
(`rpttrain.backends.trl_grpo.RptReward`). A line holds step, context, completion, prediction,
target and reward, and where known band (the task's entropy band), correct (the run's notion of a
right prediction) and status (the math reward's check). Lines of older runs, and of TRL runs
before they recorded context and target, lack some of these: they read as None, and `correct`
then falls back to reward >= 1 (the prefix reward's "right"; dense rewards give a wrong prediction
its probability, below 1).

A last line cut short (a run killed mid-write; `rptdata.io.truncate_jsonl` drops it on resume) is
skipped and reported in `Samples.torn`; a bad line anywhere else is a DamagedFile naming it.
Left out on purpose: the verl backend writes no samples.jsonl, and nothing here reads
TensorBoard's or W&B's copies of the samples.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from rptdata.errors import BadOption, DamagedFile, MissingUpstream, RptError

__all__ = [
    "FIELDS",
    "SAMPLES_FILE",
    "Samples",
    "context_tail",
    "filter_samples",
    "format_table",
    "read_samples",
    "select_steps",
    "steps_of",
    "summarize",
    "to_jsonl",
]

SAMPLES_FILE = "samples.jsonl"
# every line, as read back: the fields in this order, None where the line does not carry them
FIELDS = ("step", "band", "context", "completion", "prediction", "target", "reward", "correct", "status")


@dataclass(frozen=True)
class Samples:
    """The lines of one run's samples.jsonl, each with every FIELDS key."""

    path: Path
    lines: list[dict]
    torn: bool  # the last line was cut short (a run killed while writing it) and is left out


def read_samples(run_dir: str | Path) -> Samples:
    """RUN/samples.jsonl, each line with FIELDS filled in (None where absent; `correct` from the
    reward when not recorded). Raises MissingUpstream for a folder that is not a training run or
    has no samples yet (saying why: --sample-every 0, the verl backend, no sampled step finished),
    DamagedFile for a bad line before the last."""
    run = Path(run_dir)
    config_path = run / "config.yaml"
    if not config_path.is_file():
        raise MissingUpstream(f"{run_dir}: not an `rpt train` run directory (no config.yaml)")
    path = run / SAMPLES_FILE
    if not path.is_file():
        raise MissingUpstream(f"{run_dir}: no {SAMPLES_FILE}; {_why_no_samples(run, config_path)}")
    text = path.read_bytes().decode("utf-8", errors="replace")
    raw = text.split("\n")
    lines, torn = [], False
    for number, line in enumerate(raw, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            if number == len(raw):  # no newline after it: cut short while being written
                torn = True
                break
            raise DamagedFile(
                f"{path}:{number}: not a samples line ({e}); the lines before it read, "
                "and `rpt train ... --resume` rewrites the file from the last checkpoint"
            ) from None
        lines.append(_complete(record))
    return Samples(path, lines, torn)


def _why_no_samples(run: Path, config_path: Path) -> str:
    try:
        config = yaml.safe_load(config_path.read_text()) or {}
    except yaml.YAMLError:
        config = {}
    backend = {}
    if (run / "backend.json").is_file():
        try:
            backend = json.loads((run / "backend.json").read_text())
        except ValueError:
            pass
    every = config.get("sample_every") if isinstance(config, dict) else None
    if backend.get("backend") == "verl":
        return "the verl backend does not write one (its logs are under verl/)"
    if every == 0:
        return "this run was trained with --sample-every 0; train (or --resume) with --sample-every N to record samples"
    every_text = f"--sample-every {every}" if every else "--sample-every"
    return f"samples are written every {every_text} steps, and no such step has finished yet"


def _complete(record: dict) -> dict:
    line = {name: record.get(name) for name in FIELDS}
    if line["correct"] is None and isinstance(line["reward"], (int, float)):
        line["correct"] = line["reward"] >= 1.0
    line.update((k, v) for k, v in record.items() if k not in line)  # anything a later rpt adds
    return line


def steps_of(lines: Sequence[dict]) -> list[int]:
    """The distinct steps of `lines`, in increasing order.

    >>> steps_of([{"step": 2}, {"step": 1}, {"step": 2}])
    [1, 2]
    """
    return sorted({line["step"] for line in lines if isinstance(line.get("step"), int)})


def summarize(lines: Sequence[dict]) -> str:
    """What a samples file holds, in a few words: how many, which steps, which bands.

    >>> summarize([{"step": 10, "band": "hard"}, {"step": 20, "band": None}, {"step": 30, "band": "easy"}])
    '3 samples of steps 10-30 (3 sampled); bands easy, hard'
    >>> summarize([])
    '0 samples'
    """
    steps = steps_of(lines)
    bands = sorted({line["band"] for line in lines if line.get("band") is not None})
    text = f"{len(lines)} samples"
    if steps:
        text += (
            f" of step {steps[0]}" if len(steps) == 1 else f" of steps {steps[0]}-{steps[-1]} ({len(steps)} sampled)"
        )
    return text + (f"; bands {', '.join(bands)}" if bands else "")


def select_steps(specs: Sequence[str], present: Sequence[int]) -> set[int]:
    """The steps of `present` that the --step values name: N, A-B (inclusive), A- (from A on),
    `last` (the last step present), each value possibly a comma-separated list.

    >>> sorted(select_steps(["2", "5-6,9-"], [1, 2, 3, 5, 6, 7, 9, 10]))
    [2, 5, 6, 9, 10]
    >>> select_steps(["last"], [10, 20])
    {20}
    """
    chosen: set[int] = set()
    for spec in specs:
        for item in str(spec).split(","):
            item = item.strip().lower()
            if item == "last":
                chosen.update(present[-1:])
                continue
            lo, dash, hi = item.partition("-")
            try:
                low = int(lo)
                high = int(hi) if hi else (None if dash else low)
            except ValueError:
                raise BadOption(f"--step {spec!r}: use N, A-B, A- (from A on) or last, e.g. --step 10-20") from None
            if high is not None and high < low:
                raise BadOption(f"--step {spec!r}: the range ends before it starts")
            chosen.update(s for s in present if s >= low and (high is None or s <= high))
    return chosen


def filter_samples(
    lines: Sequence[dict],
    steps: set[int] | None = None,
    bands: Sequence[str] = (),
    right: bool | None = None,
    missing: bool = False,
) -> list[dict]:
    """The lines that pass every filter given: their step in `steps` (None: any), their band one
    of `bands` (empty: any), right (`correct`) when `right` is True and not when it is False,
    the prediction missing (null) when `missing`.

    A band filter on lines that carry no band at all (written before rpt recorded it, or answer
    tasks, which have none) raises RptError rather than answer "no samples".

    >>> rows = [{"step": 1, "band": "hard", "correct": True, "prediction": " x"},
    ...         {"step": 2, "band": "easy", "correct": False, "prediction": None}]
    >>> [r["step"] for r in filter_samples(rows, bands=("easy",))], filter_samples(rows, right=True)[0]["step"]
    ([2], 1)
    >>> [r["step"] for r in filter_samples(rows, missing=True)]
    [2]
    """
    if bands and not any(line.get("band") is not None for line in lines):
        raise RptError(
            f"--band {', '.join(bands)}: these samples record no band (written before rpt recorded "
            "the task's band, or answer tasks, which have none)"
        )
    wanted = set(bands)
    return [
        line
        for line in lines
        if (steps is None or line.get("step") in steps)
        and (not wanted or line.get("band") in wanted)
        and (right is None or bool(line.get("correct")) == right)
        and (not missing or line.get("prediction") is None)
    ]


def context_tail(text: str | None, chars: int) -> str | None:
    """The last `chars` characters of a context, "…" first when it was cut (0: all of it).

    >>> context_tail("The quick brown fox", 9), context_tail("fox", 9), context_tail("fox", 0)
    ('…brown fox', 'fox', 'fox')
    """
    if text is None or chars <= 0 or len(text) <= chars:
        return text
    return "…" + text[-chars:]


def to_jsonl(lines: Sequence[dict], context_chars: int) -> str:
    """One JSON object per line (FIELDS first), the context cut to its tail."""
    return "".join(
        json.dumps({**line, "context": context_tail(line["context"], context_chars)}, ensure_ascii=False) + "\n"
        for line in lines
    )


def _quoted(value: str | None) -> str:
    return "(none)" if value is None else json.dumps(value, ensure_ascii=False)


def _block(text: str | None) -> list[str]:
    if text is None:
        return ["    (not recorded)"]
    return ["    │ " + line for line in text.split("\n")]


def format_table(lines: Sequence[dict], context_chars: int) -> str:
    """The samples for reading: a header per sample (step, band, reward, right or wrong), the
    context's tail and the completion as indented blocks, the prediction and target quoted (a
    leading space is part of a token).

    >>> print(format_table([{"step": 3, "band": "hard", "context": "The quick brown", "completion": " fox",
    ...     "prediction": " fox", "target": " fox jumps", "reward": 1.0, "correct": True, "status": None}], 9))
    ── step 3 · band hard · reward 1 · right
    context (last 9 characters)
        │ …ick brown
    completion
        │  fox
    prediction  " fox"
    target      " fox jumps"
    <BLANKLINE>
    """
    out = []
    for line in lines:
        head = [f"step {line['step']}"]
        if line["band"] is not None:
            head.append(f"band {line['band']}")
        reward = line["reward"]
        head.append(f"reward {reward:g}" if isinstance(reward, (int, float)) else "reward ?")
        head.append("right" if line["correct"] else "wrong")
        if line["status"] is not None:
            head.append(f"check {line['status']}")
        cut = line["context"] is not None and 0 < context_chars < len(line["context"])
        out.append("── " + " · ".join(head))
        out.append(f"context (last {context_chars} characters)" if cut else "context")
        out += _block(context_tail(line["context"], context_chars))
        out.append("completion")
        out += _block(line["completion"])
        out.append(f"prediction  {_quoted(line['prediction'])}")
        out.append(f"target      {_quoted(line['target']) if line['target'] is not None else '(not recorded)'}")
        out.append("")
    return "\n".join(out)
