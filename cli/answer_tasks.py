from __future__ import annotations

import click

from cli.common import library_errors, no_progress_option, overwrite_option


@click.command("answer-tasks")
@click.argument("inputs", nargs=-1, required=True)
@click.option(
    "--out",
    "-o",
    required=True,
    type=click.Path(file_okay=False),
    help="Output directory (train/ and eval/ shards + manifest.json).",
)
@click.option(
    "--question-field",
    default=None,
    help="Record field holding the problem [default: problem, as in Omni-MATH, MATH and builtin:champ].",
)
@click.option(
    "--template",
    default=None,
    help=r'Build the problem from several fields, e.g. "{problem}\n\nGiven: {given}" (\n and \t are unescaped).',
)
@click.option("--answer-field", default="answer", show_default=True, help="Record field holding the answer.")
@click.option(
    "--answer-from",
    type=click.Choice(["plain", "gsm8k", "boxed"]),
    default="plain",
    show_default=True,
    help="Where the final answer sits in that field: the whole field | after GSM8K's '#### ' | in the last \\boxed{...}.",
)
@click.option(
    "--eval-fraction",
    default=0.1,
    show_default=True,
    type=float,
    help="Share of problems held out for evaluation (seeded hash of each problem's id).",
)
@click.option("--seed", default=0, show_default=True, type=int, help="Seeds the train/eval split.")
@click.option(
    "--exclude-overlap",
    "exclude_overlap",
    multiple=True,
    type=click.Path(exists=True, file_okay=False),
    help="A prepared corpus (`rpt prepare` output); eval problems sharing a word 13-gram with one of its "
    "documents are dropped and counted. Repeatable.",
)
@click.option("--max-problems", default=None, type=int, help="Read only the first N records (quick trials).")
@click.option("--skip-bad", is_flag=True, help="Count bad records in OUT/rejects.jsonl and go on, instead of stopping.")
@click.option("--split", default="train", show_default=True, help="Split to read from a datasets id or DatasetDict.")
@click.option("--shard-rows", default=50_000, show_default=True, type=int, help="Problems per output shard.")
@overwrite_option
@no_progress_option
@library_errors
def answer_tasks(
    inputs,
    out,
    question_field,
    template,
    answer_field,
    answer_from,
    eval_fraction,
    seed,
    exclude_overlap,
    max_problems,
    skip_bad,
    split,
    shard_rows,
    overwrite,
    no_progress,
):
    """Turn problems with a checkable final answer into answer tasks (RLVR's data).

    INPUTS are read like `rpt prepare`'s (.jsonl, .json, .parquet, folders, globs, builtin:champ).
    Each task holds the question and its reference answer; `rpt train --reward math
    --prompt-template answer` trains on them and `rpt eval --mode answer` evaluates them, both
    judging answers with math-verify. A record without a question or answer, or whose answer
    math-verify cannot read, stops the run naming the file and line (or with --skip-bad is counted).

    \b
    Example:
      rpt answer-tasks ../shared/corpora/gsm8k-train.jsonl --question-field question --answer-from gsm8k --out out/gsm8k
      rpt answer-tasks ../shared/corpora/omnimath-rule.jsonl --exclude-overlap out/omni --out out/omni-answers
      rpt answer-tasks builtin:champ --out out/champ-answers
    """
    from rptdata.answer_tasks import AnswerTasksConfig, run_answer_tasks

    config = AnswerTasksConfig(
        inputs=inputs,
        out=out,
        question_field=question_field,
        template=template,
        answer_field=answer_field,
        answer_from=answer_from,
        eval_fraction=eval_fraction,
        seed=seed,
        max_problems=max_problems,
        skip_bad=skip_bad,
        exclude_overlap=exclude_overlap,
        split=split,
        shard_rows=shard_rows,
        overwrite=overwrite,
        progress=not no_progress,
    )
    m = run_answer_tasks(config)
    c = m["counts"]
    rejected = ", ".join(f"{k} {v:,}" for k, v in c["rejected"].items() if v) or "none"
    click.echo(
        f"answer-tasks: {c['records_read']:,} records -> {c['tasks']['train']:,} train, {c['tasks']['eval']:,} eval "
        f"tasks; rejected: {rejected}; dropped: {c['dropped']['duplicate_question']:,} duplicate questions, "
        f"{c['dropped']['overlap']:,} eval problems overlapping a corpus -> {out} ({m['seconds']:.1f} s)"
    )
