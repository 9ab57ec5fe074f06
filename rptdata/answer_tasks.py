"""`rpt answer-tasks`: problems with a checkable final answer -> answer tasks (train and eval splits),
the data of RLVR after a pretraining-stage run (the paper's Table 2).

    run_answer_tasks(AnswerTasksConfig(inputs=("gsm8k-train.jsonl",), out="out/answers",
                                       question_field="question", answer_from="gsm8k"))

Inputs are read by `rpt prepare`'s readers (`rptdata.sources`: .jsonl, .json, .parquet, folders,
globs, builtin:champ, datasets). Per record:
    question   `--question-field F` (default `problem`) or `--template "{a}\\n\\n{b}"`
    answer     `--answer-field F` (default `answer`), read by `--answer-from`: plain (the whole
               field), gsm8k (after the last `####`), boxed (the last complete \\boxed{...})
A record without a question or an answer, or whose answer math-verify cannot read
(`rptdata.math_answers.parse_reference`), stops the run naming the file and line; with
`--skip-bad` it goes to OUT/rejects.jsonl and is counted. A question seen before (the same text)
is dropped and counted (`duplicate_question`), so one problem cannot sit in both splits.

The split is by problem (doc_id = "<source>#<row>", as `rpt prepare` names records), with the seeded
hash every tasks directory uses (`rptdata.tasks.taskdef.split_of`), recorded in the manifest.
`--exclude-overlap PREP_DIR` (repeatable) drops eval problems that share a word 13-gram with a
document of that prepared corpus (`rptdata.overlap`), counted per corpus in the manifest.

Output (OUT/): train/part-NNNNN.parquet and eval/part-NNNNN.parquet (ANSWER_TASKS_SCHEMA, at most
`shard_rows` rows each), done/ markers, rejects.jsonl (with --skip-bad), manifest.json last. The
rows carry the columns every tasks reader reads (`context` = the question, `continuation` = the
answer, `boundaries` empty), so `rpt train`, `probe`, `eval` and `export-tasks` read them as they
read `rpt make-tasks` output; the manifest's `task_kind` ("answer") tells them apart.

Memory: one train shard and the eval problems (a problem set's eval split; the overlap guard
needs all of them before it scans). A killed run is redone from the start (it is one pass over
the inputs); a finished one is kept.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa

from rptdata.errors import BadInput, BadOption
from rptdata.io import MANIFEST, STAGE_ANSWER_TASKS, shard_name
from rptdata.math_answers import ANSWER_FROM, answer_from, parse_reference
from rptdata.overlap import NGRAM, NgramIndex
from rptdata.sources import TextBuilder, expand_inputs, read_source
from rptdata.stage import StageDir
from rptdata.tasks.taskdef import SPLITS, split_of, split_rule

log = logging.getLogger(__name__)

STAGE = STAGE_ANSWER_TASKS
TASK_KIND = "answer"
REJECT_REASONS = (
    "malformed_json",
    "invalid_utf8",
    "not_an_object",
    "missing_field",
    "missing_answer",
    "bad_field_type",
    "unreadable_file",
    "empty_question",
    "no_answer",
    "answer_unparseable",
)

ANSWER_TASKS_SCHEMA = pa.schema(
    [
        ("task_id", pa.string()),  # = doc_id: one task per problem
        ("doc_id", pa.string()),  # "<source>#<row>", what the split is computed from
        ("question", pa.string()),
        ("answer", pa.string()),  # the reference final answer (after --answer-from)
        ("source", pa.string()),  # the input file (or builtin:champ)
        # the columns every tasks reader reads (rpttrain.data.TASK_COLUMNS, export, eval)
        ("pos", pa.int32()),  # 0: a problem is not a position
        ("context", pa.string()),  # = question: what the prompt shows
        ("continuation", pa.string()),  # = answer: what the reward checks against
        ("boundaries", pa.list_(pa.int32())),  # empty: no token boundaries
        ("target_id", pa.int32()),  # null
        ("entropy", pa.float32()),  # null: answer tasks have no band (eval reports them as "other")
        ("band", pa.string()),  # null
    ]
)


@dataclass(frozen=True)
class AnswerTasksConfig:
    """Options of `rpt answer-tasks` (see the module docstring)."""

    inputs: tuple[str, ...]
    out: str
    question_field: str | None = None
    template: str | None = None
    answer_field: str = "answer"
    answer_from: str = "plain"
    eval_fraction: float = 0.1
    seed: int = 0
    max_problems: int | None = None
    skip_bad: bool = False
    exclude_overlap: tuple[str, ...] = ()
    split: str = "train"
    shard_rows: int = 50_000
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self):
        object.__setattr__(self, "inputs", tuple(self.inputs))
        object.__setattr__(self, "exclude_overlap", tuple(str(p) for p in self.exclude_overlap))
        if not self.inputs:
            raise BadOption("give at least one input")
        if self.answer_from not in ANSWER_FROM:
            raise BadOption(f"--answer-from must be one of {', '.join(ANSWER_FROM)}, not {self.answer_from!r}")
        if not 0.0 <= self.eval_fraction <= 1.0:
            raise BadOption(f"--eval-fraction must lie in [0, 1], not {self.eval_fraction}")
        if self.max_problems is not None and self.max_problems < 1:
            raise BadOption("--max-problems must be at least 1")
        if self.shard_rows < 1:
            raise BadOption("--shard-rows must be at least 1")
        for prep in self.exclude_overlap:
            if not (Path(prep) / MANIFEST).exists():
                raise BadOption(f"--exclude-overlap {prep}: not a finished `rpt prepare` directory (no {MANIFEST})")
        self.builder()  # a bad --template fails here

    def builder(self) -> TextBuilder:
        field = None if self.template else (self.question_field or "problem")
        return TextBuilder(text_field=field, template=self.template, answer_field=self.answer_field)

    def identity(self) -> dict:
        d = asdict(self)
        for k in ("out", "overwrite", "progress"):
            d.pop(k)
        return d


class _Rejects:
    """Bad records: an error naming the file and line, or (with --skip-bad) a counted line of rejects.jsonl."""

    def __init__(self, path: Path, skip: bool):
        self.path, self.skip = path, skip
        self.counts = dict.fromkeys(REJECT_REASONS, 0)
        self.file = None

    def add(self, where: str, reason: str, detail: str) -> None:
        if not self.skip:
            raise BadInput(f"{where}: {detail} (pass --skip-bad to count and skip such records)")
        self.counts[reason] = self.counts.get(reason, 0) + 1
        if self.file is None:
            self.file = self.path.open("w", encoding="utf-8")
        self.file.write(json.dumps({"where": where, "reason": reason, "detail": detail}) + "\n")

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def _rows(records: list[dict]) -> pa.Table:
    cols = {f.name: [] for f in ANSWER_TASKS_SCHEMA}
    for r in records:
        for name in cols:
            cols[name].append(r.get(name))
    return pa.Table.from_pydict(cols, schema=ANSWER_TASKS_SCHEMA)


def _task(doc_id: str, source: str, question: str, answer: str) -> dict:
    return {
        "task_id": doc_id,
        "doc_id": doc_id,
        "question": question,
        "answer": answer,
        "source": source,
        "pos": 0,
        "context": question,
        "continuation": answer,
        "boundaries": [],
        "target_id": None,
        "entropy": None,
        "band": None,
    }


def run_answer_tasks(config: AnswerTasksConfig) -> dict:
    """Run the stage (see the module docstring); returns the manifest."""
    from tqdm import tqdm

    started = time.time()
    sources = expand_inputs(list(config.inputs))
    out = Path(config.out)
    stage = StageDir(out, STAGE, list(SPLITS))
    state = stage.begin(
        {
            "inputs": [s.fingerprint() for s in sources],
            "options": config.identity(),
            "overlap_corpora": [_prepared_fingerprint(p) for p in config.exclude_overlap],
        },
        overwrite=config.overwrite,
    )
    if state == "done":
        log.info("%s is already complete; nothing to do", out)
        return json.loads((out / MANIFEST).read_text())
    builder = config.builder()
    rejects = _Rejects(out / "rejects.jsonl", config.skip_bad)
    seen: set[bytes] = set()
    train: list[dict] = []
    held_out: list[dict] = []
    train_shards = 0
    read = duplicates = 0
    bar = tqdm(desc="answer-tasks", unit=" problem", disable=not config.progress, dynamic_ncols=True)
    try:
        for src in sources:
            for rec in read_source(src, builder, config.split):
                if config.max_problems is not None and read >= config.max_problems:
                    break
                read += 1
                bar.update(1)
                if rec.reject:
                    rejects.add(rec.where(), rec.reject, rec.detail)
                    continue
                question = rec.text or ""
                if not question.strip():
                    rejects.add(rec.where(), "empty_question", "the question is empty")
                    continue
                answer = answer_from(rec.answer or "", config.answer_from)
                if answer is None:
                    rejects.add(
                        rec.where(),
                        "no_answer",
                        f"no final answer in field {config.answer_field!r} by --answer-from {config.answer_from}"
                        f" (field starts {(rec.answer or '')[:60]!r})",
                    )
                    continue
                if not parse_reference(answer):
                    rejects.add(
                        rec.where(), "answer_unparseable", f"math-verify reads nothing in the answer {answer!r}"
                    )
                    continue
                key = hashlib.sha256(question.encode("utf-8", "surrogatepass")).digest()[:16]
                if key in seen:
                    duplicates += 1
                    continue
                seen.add(key)
                task = _task(rec.doc_id, rec.source, question, answer)
                if split_of(rec.doc_id, config.seed, config.eval_fraction) == "eval":
                    held_out.append(task)
                else:
                    train.append(task)
                    if len(train) >= config.shard_rows:
                        stage.write_shard("train", train_shards, _rows(train), {})
                        train_shards += 1
                        train = []
            else:
                continue
            break  # --max-problems reached
    finally:
        bar.close()
        rejects.close()
    n_train = train_shards * config.shard_rows + len(train)
    if train or train_shards == 0:
        stage.write_shard("train", train_shards, _rows(train), {})
        train_shards += 1
    overlap, held_out = _exclude_overlap(held_out, config)
    eval_shards = max(1, -(-len(held_out) // config.shard_rows))
    for i in range(eval_shards):
        stage.write_shard("eval", i, _rows(held_out[i * config.shard_rows : (i + 1) * config.shard_rows]), {})
    rejected = sum(rejects.counts.values())
    dropped = duplicates + sum(o["problems_dropped"] for o in overlap.values())
    if read != n_train + len(held_out) + rejected + dropped:  # an internal invariant, not user input
        raise AssertionError(f"record accounting broke: read {read} != kept + rejected + dropped")
    if n_train + len(held_out) == 0:
        log.warning("no answer task was written: every record was rejected or dropped")
    return stage.finish(
        {
            "task_kind": TASK_KIND,
            "inputs": [s.path for s in sources],
            "options": config.identity(),
            "split": split_rule(config.seed, config.eval_fraction),
            "shards": {
                "train": [f"train/{shard_name(i)}" for i in range(train_shards)],
                "eval": [f"eval/{shard_name(i)}" for i in range(eval_shards)],
            },
            "schema": {f.name: str(f.type) for f in ANSWER_TASKS_SCHEMA},
            "counts": {
                "records_read": read,
                "tasks": {"train": n_train, "eval": len(held_out)},
                "rejected": rejects.counts,
                "dropped": {
                    "duplicate_question": duplicates,
                    "overlap": sum(o["problems_dropped"] for o in overlap.values()),
                },
            },
            "overlap": {"rule": f"word {NGRAM}-grams (rptdata.overlap)", "corpora": overlap},
            "seconds": round(time.time() - started, 2),
        }
    )


def _prepared_fingerprint(prepared_dir: str) -> str | None:
    return json.loads((Path(prepared_dir) / MANIFEST).read_text()).get("fingerprint")


def _exclude_overlap(held_out: list[dict], config: AnswerTasksConfig) -> tuple[dict, list[dict]]:
    """Drop the eval problems that overlap a --exclude-overlap corpus; per corpus, the documents
    scanned and the problems it dropped (a problem is counted for the first corpus it overlaps)."""
    if not config.exclude_overlap or not held_out:
        return {p: {"documents_scanned": 0, "problems_dropped": 0} for p in config.exclude_overlap}, held_out
    index = NgramIndex([t["question"] for t in held_out])
    report = {}
    for prep in config.exclude_overlap:
        before = int(index.hits.sum())
        scanned = index.scan_prepared(prep, progress=config.progress)
        report[prep] = {"documents_scanned": scanned, "problems_dropped": int(index.hits.sum()) - before}
        log.info("%s: %d eval problems overlap it", prep, report[prep]["problems_dropped"])
    return report, [t for t, hit in zip(held_out, index.hits) if not hit]
